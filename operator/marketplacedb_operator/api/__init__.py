"""The MarketplaceDB API: pydantic models are the single source of truth for the CRD schema."""
