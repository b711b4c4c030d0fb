"""MarketplaceDB spec, database side, re-exported in one place: database.py (the database, its TLS and
settings, the DDL policy), indexes.py (index methods, columns, operator classes) and views.py
(materialized views and their refresh policy). v1alpha1.py assembles the resource from these.
"""

from __future__ import annotations

from .database import EXTENSIONS, ClientCertRef, DatabaseSpec, DatabaseTLS, DataKey, DDLPolicy, KeyRef, SecretRef
from .indexes import EXTENSION_OF_OPCLASS, OPCLASSES, IndexColumn, IndexMethod, IndexSpec, IndexStorage
from .types import AdoptPolicy
from .views import MaterializedViewSpec, RefreshPolicy

__all__ = [
    "EXTENSIONS",
    "EXTENSION_OF_OPCLASS",
    "OPCLASSES",
    "AdoptPolicy",
    "ClientCertRef",
    "DDLPolicy",
    "DataKey",
    "DatabaseSpec",
    "DatabaseTLS",
    "IndexColumn",
    "IndexMethod",
    "IndexSpec",
    "IndexStorage",
    "KeyRef",
    "MaterializedViewSpec",
    "RefreshPolicy",
    "SecretRef",
]
