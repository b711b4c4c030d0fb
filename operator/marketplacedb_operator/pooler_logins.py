"""Who logs in through the pooler, as auth-file entries: the owner (when allowed), each application
role of spec.pooler.users, and the authQuery's auth_user (whose lookup function must exist).

Secrets are read through the caller's `read` (the same opt-in rule and error reporting as the
owner's Secret); the database answers whether a verifier is readable and the function exists.
"""

from __future__ import annotations

from collections.abc import Callable

from .api.v1alpha1 import MarketplaceDBSpec, SecretRef
from .ports import Database
from .specs.pgbouncer import PoolerCredentials, choose_credentials


class LookupFunctionMissing(Exception):
    """spec.pooler.authQuery.function does not exist in the database (the message says what to do)."""

    reason = "AuthQueryFunctionMissing"


def owner_logs_in(spec: MarketplaceDBSpec) -> bool:
    pooler = spec.pooler
    return pooler.owner_login if pooler.owner_login is not None else not pooler.users


def entries(spec: MarketplaceDBSpec, database: Database,
            read: Callable[[SecretRef, str], tuple[str, str]]) -> tuple[list[PoolerCredentials], str | None]:
    """(auth-file entries, auth_user name or None). `read(ref, field)` raises the caller's error."""
    pooler = spec.pooler
    refs = [(u.credentials_secret_ref, f"spec.pooler.users[{i}].credentialsSecretRef")
            for i, u in enumerate(pooler.users)]
    if owner_logs_in(spec):
        refs.insert(0, (spec.database.credentials_secret_ref, "spec.database.credentialsSecretRef"))
    auth = pooler.auth_query
    if auth is not None:
        if not database.lookup_function_exists(auth.function):
            raise LookupFunctionMissing(
                f"spec.pooler.authQuery.function: {auth.function}(text) does not exist in database "
                f"{spec.database.dbname}; an administrator creates it with the SQL in the README (Pooler)"
            )
        refs.append((auth.credentials_secret_ref, "spec.pooler.authQuery.credentialsSecretRef"))
    found = []
    for ref, field in refs:
        user, password = read(ref, field)
        found.append(choose_credentials(user, password, database.scram_verifier(user), field))
    auth_user = found[-1].username if auth is not None else None
    unique = list({e.username: e for e in found}.values())  # the auth_user may also be a listed user
    return unique, auth_user
