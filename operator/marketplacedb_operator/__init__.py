"""marketplacedb-operator: keeps a marketplace's PostgreSQL fast and available from Kubernetes."""

__version__ = "0.1.0"
