"""The reference marketplace workload (docs/architecture.md#reference-workload): schema, data and home-page queries.

Pure text builders, no I/O: tests, the demo and the benchmark feed the SQL to a database
themselves (`examples/generate.py --products N --schema | psql`).

The data is deterministic: every pseudo-random value comes from `hashint8extended(row number,
salt)`, never `random()` or `now()`, so the same `(products, seed)` always gives the same rows.
It is made in the server by `generate_series` (no rows cross the network) with the foreign keys
dropped during the load and validated once after it, so two million products (about 6.5 million
rows, ~1 GB) load in about half a minute of one core.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Final

MIN_PRODUCTS: Final = 10
MAX_PRODUCTS: Final = 100_000_000
MAX_SEED: Final = 1_000_000
CATEGORIES: Final = 50


@dataclasses.dataclass(frozen=True)
class WorkloadSize:
    """Row counts of one generated data set."""

    products: int
    ai_accounts: int
    seller_products: int
    sellers: int
    categories: int
    orders: int
    searches: int
    popular_searches: int
    users: int  # distinct buyer/searcher ids (there is no users table)


def workload_size(products: int) -> WorkloadSize:
    """How many rows `data_sql(products)` writes to each table."""
    if isinstance(products, bool) or not isinstance(products, int):
        raise TypeError(f"products must be an int, not {type(products).__name__}")
    if not MIN_PRODUCTS <= products <= MAX_PRODUCTS:
        raise ValueError(f"products must be {MIN_PRODUCTS}..{MAX_PRODUCTS}, not {products}")
    ai = products * 3 // 10
    return WorkloadSize(
        products=products,
        ai_accounts=ai,
        seller_products=products - ai,
        sellers=max(5, products // 100),
        categories=CATEGORIES,
        orders=products,
        searches=products,
        popular_searches=min(10_000, max(10, products // 10)),
        users=max(100, products // 10),
    )


def schema_sql() -> str:
    """The reference tables (primary and foreign keys only: the operator adds the indexes)."""
    return resources.files("marketplacedb_operator").joinpath("data", "schema.sql").read_text(encoding="utf-8")


def data_sql(products: int, seed: int = 1) -> str:
    """SQL that fills every reference table for `products` products, then ANALYZEs.

    Run it once, on the empty tables of `schema_sql()`, in autocommit mode (psql's default,
    psycopg's `autocommit=True`): it runs its own transaction and uses temporary helper functions
    of its session. Only validated ints are formatted into the text.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be 0..{MAX_SEED}, not {seed}")
    size = workload_size(products)
    return _DATA_TEMPLATE.format(seed=seed, **dataclasses.asdict(size))


# --- the home page, as the BFF queries it -----------------------------------------------------

# Top 100 available products across both catalogues. The ORDER BY breaks sold_count ties on the
# unique key, so the base query and the view return the very same 100 rows.
_HOT_PRODUCTS: Final = """\
SELECT 'ai'::text AS product_type, a.id, a.name, a.price, a.icon_url, a.sold_count, a.view_count,
       a.created_at, a.category_id, NULL::bigint AS seller_id, NULL::text AS store_name
FROM ai_accounts AS a
WHERE a.is_available = true
UNION ALL
SELECT 'seller'::text, p.id, p.name, p.price, p.icon_url, p.sold_count, p.view_count,
       p.created_at, p.category_id, p.seller_id, s.store_name
FROM seller_products AS p
JOIN seller_profiles AS s ON s.id = p.seller_id
WHERE p.is_available = true AND p.is_approved = true
ORDER BY sold_count DESC, product_type, id
LIMIT 100"""

# Active categories with the number of products a shopper can buy in each. The subqueries match
# the predicates of the two partial indexes on (category_id, sold_count DESC).
_CATEGORY_COUNTS: Final = """\
SELECT c.id, c.name, c.icon, c.color, c.display_order,
       (SELECT count(*) FROM ai_accounts AS a
         WHERE a.category_id = c.id AND a.is_available = true)
     + (SELECT count(*) FROM seller_products AS p
         WHERE p.category_id = c.id AND p.is_available = true AND p.is_approved = true) AS product_count
FROM categories AS c
WHERE c.is_active = true"""

VIEW_QUERIES: Final[dict[str, str]] = {
    "mv_hot_products": _HOT_PRODUCTS,
    "mv_category_counts": _CATEGORY_COUNTS,
}
"""The SELECT of each materialized view, exactly as in examples/marketplacedb.yaml."""

VIEW_UNIQUE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "mv_hot_products": ("product_type", "id"),
    "mv_category_counts": ("id",),
}
"""The unique key of each view (what REFRESH ... CONCURRENTLY needs)."""

HOME_QUERIES_BASE: Final[dict[str, str]] = {
    "hot_products": _HOT_PRODUCTS,
    "category_counts": _CATEGORY_COUNTS + "\nORDER BY display_order, id",
}
"""The home page before the operator: both queries computed from the base tables."""

HOME_QUERIES_VIEWS: Final[dict[str, str]] = {
    "hot_products": """\
SELECT product_type, id, name, price, icon_url, sold_count, view_count, created_at, category_id,
       seller_id, store_name
FROM mv_hot_products
ORDER BY sold_count DESC, product_type, id""",
    "category_counts": """\
SELECT id, name, icon, color, display_order, product_count
FROM mv_category_counts
ORDER BY display_order, id""",
}
"""The home page with the operator: the same rows, in the same order, read from the views."""

SEARCH_QUERIES: Final[dict[str, str]] = {
    # Product search box: a substring anywhere in the name (served by the trigram GIN index
    # idx_seller_products_name_trgm; without it, a sequential scan of seller_products).
    "product_search": """\
SELECT id, name, price FROM seller_products
WHERE name ILIKE '%%' || %(term)s || '%%' AND is_available = true AND is_approved = true
ORDER BY sold_count DESC, id LIMIT 20""",
    # Filters: products with given attributes (served by idx_seller_products_attributes, jsonb_path_ops).
    "attribute_filter": """\
SELECT id, name, price FROM seller_products
WHERE attributes @> %(filter)s::jsonb AND is_available = true AND is_approved = true
ORDER BY sold_count DESC, id LIMIT 20""",
}
"""Search and filter queries of the shop (issue 18), with psycopg named parameters."""

ORDER_QUERIES: Final[dict[str, str]] = {
    # Seller dashboard, activity feed: a seller's latest order events of the last 30 days, from the
    # time-partitioned seller_order_events (partitions pruned by created_at, then
    # idx_order_events_seller_recent in each remaining partition).
    "seller_activity": """\
SELECT order_id, status, created_at FROM seller_order_events
WHERE seller_id = %(seller)s AND created_at >= %(since)s::timestamptz
ORDER BY created_at DESC LIMIT 50""",
}
"""Queries on the partitioned order history (issue 18), with psycopg named parameters."""


# --- the data ---------------------------------------------------------------------------------
# Placeholders are the WorkloadSize fields and `seed`. Each row hashes its number a few times
# (subquery `r`, fenced with OFFSET 0 so that each hash is computed once, not once per use) and
# takes its values from disjoint bits of those hashes: a hash feeds either one wl_unit (its low 32
# bits) and wl_bits parts 2 and 3, or wl_bits parts 0 to 3. Fewer hashes, faster load.
# Skew: sold_count is Pareto-distributed (P(sold >= x) ~ 10/x, a handful above 100k), categories,
# sellers and users are picked with a quadratic bias towards low ids, searches follow Zipf.

_DATA_TEMPLATE: Final = """\
-- Reference marketplace data: {products} products, seed {seed} (marketplacedb_operator.workload).
-- Run in autocommit mode (psql's default): it manages its own transaction.
BEGIN;
CREATE FUNCTION pg_temp.wl_hash(i bigint, salt integer) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT hashint8extended(i, {seed}::bigint * 1000 + salt) $$;
-- 16-bit part 0..3 of a hash: 0..65535.
CREATE FUNCTION pg_temp.wl_bits(h bigint, part integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT ((h >> (16 * part)) & 65535)::integer $$;
-- [0, 1) from the low 32 bits (parts 0 and 1).
CREATE FUNCTION pg_temp.wl_unit(h bigint) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (h & 4294967295) / 4294967296.0::double precision $$;
-- 1..n, low ids more likely.
CREATE FUNCTION pg_temp.wl_skewed(h bigint, n integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1 + floor(n * pg_temp.wl_unit(h) ^ 2)::integer $$;
-- 0..~1,000,000, Pareto: most items sell a little, a few sell a lot.
CREATE FUNCTION pg_temp.wl_sold(h bigint) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT floor(10 / (1 - 0.99999 * pg_temp.wl_unit(h)))::integer - 10 $$;
-- The moment `s` seconds before 2025-01-01 00:00 UTC (a fixed origin: no now(), same rows every day).
CREATE FUNCTION pg_temp.wl_ago(s integer) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT to_timestamp(1735689600 - s) $$;
-- A distinct search text per rank q >= 1 (144 two-word queries, then numbered ones).
CREATE FUNCTION pg_temp.wl_query(q integer) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT (ARRAY['chatgpt', 'claude', 'midjourney', 'gemini', 'copilot', 'voice', 'video',
                         'prompt', 'api', 'image', 'code', 'music'])[1 + q % 12]
                 || ' ' || (ARRAY['account', 'plus', 'pro', 'credits', 'cheap', 'bundle', 'team',
                                  'prompts', 'generator', 'trial', 'lifetime', 'api key'])[1 + q / 12 % 12]
                 || CASE WHEN q >= 144 THEN ' ' || q::text ELSE '' END $$;

-- Foreign keys are checked by a trigger per row (~10 us each, 70% of the load time): drop them
-- for the load and add them back after it, when one join validates each (what pg_restore does).
ALTER TABLE ai_accounts DROP CONSTRAINT ai_accounts_category_id_fkey;
ALTER TABLE seller_products DROP CONSTRAINT seller_products_seller_id_fkey,
    DROP CONSTRAINT seller_products_category_id_fkey;
ALTER TABLE seller_orders DROP CONSTRAINT seller_orders_seller_id_fkey,
    DROP CONSTRAINT seller_orders_product_id_fkey;

-- 50 categories = 10 areas x 5 kinds; every tenth is inactive.
INSERT INTO categories (id, name, slug, icon, color, display_order, is_active, created_at)
SELECT g, area || ' ' || kind, lower(replace(area || ' ' || kind, ' ', '-')),
       'icon-' || lower(replace(area, ' ', '-')),
       '#' || lpad(to_hex(pg_temp.wl_hash(g, 1) & 16777215), 6, '0'),
       g, g % 10 <> 0, timestamptz '2023-01-01 00:00:00+00'
FROM generate_series(1, {categories}) AS g,
     LATERAL (SELECT (ARRAY['AI Chat', 'Image Generation', 'Video', 'Voice', 'Coding', 'Writing', 'Music',
                            'Productivity', 'Research', 'Translation'])[1 + (g - 1) % 10] AS area,
                     (ARRAY['Accounts', 'Subscriptions', 'Credits', 'Bundles', 'Tools'])[1 + (g - 1) / 10 % 5]
                         AS kind) AS n;

-- AI accounts sold by the marketplace itself: 85% available.
INSERT INTO ai_accounts (id, name, description, price, icon_url, category_id, sold_count, view_count, rating,
                         is_available, created_at, updated_at)
SELECT r.g,
       (ARRAY['ChatGPT Plus', 'Claude Pro', 'Midjourney', 'Gemini Advanced', 'Copilot Pro', 'Perplexity Pro',
              'Runway', 'ElevenLabs'])[1 + pg_temp.wl_bits(r.a, 2) % 8] || ' #' || r.g,
       'Shared account, ' || 1 + pg_temp.wl_bits(r.a, 3) % 12 || ' month(s)',
       (200 + pg_temp.wl_bits(r.b, 0) % 19800) * 0.01,
       'https://cdn.example.com/ai/' || pg_temp.wl_bits(r.b, 1) % 500 || '.png',
       pg_temp.wl_skewed(r.c, {categories}),
       v.sold,
       v.sold * (3 + pg_temp.wl_bits(r.b, 2) % 17) + pg_temp.wl_bits(r.b, 3) % 1000,
       (300 + pg_temp.wl_bits(r.c, 2) % 200) * 0.01,
       pg_temp.wl_bits(r.c, 3) % 100 < 85,
       pg_temp.wl_ago(pg_temp.wl_bits(r.d, 0) * 962),
       pg_temp.wl_ago(pg_temp.wl_bits(r.d, 0) * 962 - pg_temp.wl_bits(r.d, 1) * 40)
FROM (SELECT g, pg_temp.wl_hash(g, 10) AS a, pg_temp.wl_hash(g, 11) AS b, pg_temp.wl_hash(g, 12) AS c,
             pg_temp.wl_hash(g, 13) AS d
      FROM generate_series(1, {ai_accounts}) AS g OFFSET 0) AS r,
     LATERAL (SELECT pg_temp.wl_sold(r.a) AS sold) AS v;

-- Sellers: 30% verified.
INSERT INTO seller_profiles (id, user_id, store_name, store_slug, description, rating, is_verified, created_at)
SELECT r.g, 1000000 + r.g,
       (ARRAY['Prompt', 'Pixel', 'Neural', 'Vector', 'Quantum', 'Token', 'Tensor', 'Agent'])
           [1 + pg_temp.wl_bits(r.a, 0) % 8]
       || ' ' || (ARRAY['Works', 'Lab', 'Studio', 'Store', 'Hub', 'Market'])[1 + pg_temp.wl_bits(r.a, 1) % 6]
       || ' ' || r.g,
       'store-' || r.g,
       'Digital goods, instant delivery',
       (300 + pg_temp.wl_bits(r.a, 2) % 200) * 0.01,
       pg_temp.wl_bits(r.a, 3) % 100 < 30,
       pg_temp.wl_ago(31536000 + pg_temp.wl_bits(r.b, 0) * 481)
FROM (SELECT g, pg_temp.wl_hash(g, 30) AS a, pg_temp.wl_hash(g, 31) AS b
      FROM generate_series(1, {sellers}) AS g OFFSET 0) AS r;

-- Seller products: 80% available, 90% approved (72% visible). Orders re-derive a product's
-- seller and price from its hashes 40 (r.a) and 43 (r.d).
INSERT INTO seller_products (id, seller_id, category_id, name, description, price, icon_url, stock, sold_count,
                             view_count, rating, is_available, is_approved, created_at, updated_at, attributes)
SELECT r.g,
       pg_temp.wl_skewed(r.a, {sellers}),
       pg_temp.wl_skewed(r.b, {categories}),
       (ARRAY['Prompt pack', 'API credits', 'Fine-tuned model', 'Dataset', 'Chatbot template',
              'Automation workflow', 'Voice clone', 'Avatar pack'])[1 + pg_temp.wl_bits(r.a, 2) % 8] || ' #' || r.g,
       CASE WHEN pg_temp.wl_bits(r.a, 3) % 3 = 0 THEN 'Manual delivery within 24h' ELSE 'Instant delivery' END,
       (100 + pg_temp.wl_bits(r.d, 0) % 9900) * 0.01,
       'https://cdn.example.com/sp/' || pg_temp.wl_bits(r.d, 1) % 2000 || '.png',
       pg_temp.wl_bits(r.d, 2) % 500,
       v.sold,
       v.sold * (3 + pg_temp.wl_bits(r.b, 2) % 17) + pg_temp.wl_bits(r.b, 3) % 1000,
       (300 + pg_temp.wl_bits(r.d, 3) % 200) * 0.01,
       pg_temp.wl_bits(r.c, 2) % 100 < 80,
       pg_temp.wl_bits(r.c, 3) % 100 < 90,
       pg_temp.wl_ago(pg_temp.wl_bits(r.e, 0) * 962),
       pg_temp.wl_ago(pg_temp.wl_bits(r.e, 0) * 962 - pg_temp.wl_bits(r.e, 1) * 40),
       jsonb_build_object(
         'delivery', CASE WHEN pg_temp.wl_bits(r.a, 3) % 3 = 0 THEN 'manual' ELSE 'instant' END,
         'language', (ARRAY['en', 'de', 'fr', 'es', 'ja', 'pt'])[1 + pg_temp.wl_bits(r.e, 2) % 6],
         'license', (ARRAY['personal', 'commercial', 'enterprise'])[1 + pg_temp.wl_bits(r.e, 3) % 3])
FROM (SELECT g, pg_temp.wl_hash(g, 40) AS a, pg_temp.wl_hash(g, 41) AS b, pg_temp.wl_hash(g, 42) AS c,
             pg_temp.wl_hash(g, 43) AS d, pg_temp.wl_hash(g, 44) AS e
      FROM generate_series(1, {seller_products}) AS g OFFSET 0) AS r,
     LATERAL (SELECT pg_temp.wl_sold(r.c) AS sold) AS v;

-- Orders of seller products over the last year; each carries its product's seller and price.
INSERT INTO seller_orders (id, seller_id, product_id, buyer_id, quantity, amount, status, created_at, updated_at)
SELECT r.g,
       pg_temp.wl_skewed(pg_temp.wl_hash(v.product, 40), {sellers}),
       v.product,
       pg_temp.wl_skewed(r.b, {users}),
       v.quantity,
       v.quantity * (100 + pg_temp.wl_bits(pg_temp.wl_hash(v.product, 43), 0) % 9900) * 0.01,
       CASE WHEN v.s < 55 THEN 'delivered' WHEN v.s < 70 THEN 'paid' WHEN v.s < 85 THEN 'pending'
            WHEN v.s < 95 THEN 'cancelled' ELSE 'refunded' END,
       pg_temp.wl_ago(pg_temp.wl_bits(r.c, 0) * 481),
       pg_temp.wl_ago(pg_temp.wl_bits(r.c, 0) * 481 - pg_temp.wl_bits(r.c, 1) * 9)
FROM (SELECT g, pg_temp.wl_hash(g, 60) AS a, pg_temp.wl_hash(g, 61) AS b, pg_temp.wl_hash(g, 62) AS c
      FROM generate_series(1, {orders}) AS g OFFSET 0) AS r,
     LATERAL (SELECT 1 + floor({seller_products} * pg_temp.wl_unit(r.a))::integer AS product,
                     CASE WHEN pg_temp.wl_bits(r.a, 2) % 10 = 0 THEN 2 + pg_temp.wl_bits(r.a, 3) % 3 ELSE 1 END
                         AS quantity,
                     pg_temp.wl_bits(r.b, 2) % 100 AS s) AS v;

-- Order events: each order's latest status, at its update time, in the time-partitioned history.
INSERT INTO seller_order_events (id, order_id, seller_id, status, created_at)
SELECT o.id, o.id, o.seller_id, o.status, o.updated_at FROM seller_orders AS o;

-- Searches of the last 90 days: heavy users, Zipf-ranked queries.
INSERT INTO search_history (id, user_id, query, results_count, created_at)
SELECT r.g,
       pg_temp.wl_skewed(r.a, {users}),
       pg_temp.wl_query(r.q),
       pg_temp.wl_bits(r.a, 2) % 200,
       pg_temp.wl_ago(pg_temp.wl_bits(r.a, 3) * 119)
FROM (SELECT g, pg_temp.wl_hash(g, 70) AS a, pg_temp.wl_skewed(pg_temp.wl_hash(g, 71), {popular_searches}) AS q
      FROM generate_series(1, {searches}) AS g OFFSET 0) AS r;

-- Popular searches: search_count ~ 1,000,000 / rank; the top 20 and 3% of the rest trending.
INSERT INTO popular_searches (id, query, search_count, is_trending, last_searched_at)
SELECT r.g,
       pg_temp.wl_query(r.g),
       1000000 / r.g + pg_temp.wl_bits(r.a, 0) % 100,
       r.g <= 20 OR pg_temp.wl_bits(r.a, 1) % 100 < 3,
       pg_temp.wl_ago(pg_temp.wl_bits(r.a, 2) * 9)
FROM (SELECT g, pg_temp.wl_hash(g, 80) AS a FROM generate_series(1, {popular_searches}) AS g OFFSET 0) AS r;

ALTER TABLE ai_accounts ADD CONSTRAINT ai_accounts_category_id_fkey
    FOREIGN KEY (category_id) REFERENCES categories (id);
ALTER TABLE seller_products ADD CONSTRAINT seller_products_seller_id_fkey
    FOREIGN KEY (seller_id) REFERENCES seller_profiles (id),
    ADD CONSTRAINT seller_products_category_id_fkey FOREIGN KEY (category_id) REFERENCES categories (id);
ALTER TABLE seller_orders ADD CONSTRAINT seller_orders_seller_id_fkey
    FOREIGN KEY (seller_id) REFERENCES seller_profiles (id),
    ADD CONSTRAINT seller_orders_product_id_fkey FOREIGN KEY (product_id) REFERENCES seller_products (id);

-- Ids were given explicitly: move the sequences past them so that later inserts work.
SELECT setval(pg_get_serial_sequence('categories', 'id'), {categories}),
       setval(pg_get_serial_sequence('ai_accounts', 'id'), {ai_accounts}),
       setval(pg_get_serial_sequence('seller_profiles', 'id'), {sellers}),
       setval(pg_get_serial_sequence('seller_products', 'id'), {seller_products}),
       setval(pg_get_serial_sequence('seller_orders', 'id'), {orders}),
       setval(pg_get_serial_sequence('seller_order_events', 'id'), {orders}),
       setval(pg_get_serial_sequence('search_history', 'id'), {searches}),
       setval(pg_get_serial_sequence('popular_searches', 'id'), {popular_searches});

DROP FUNCTION pg_temp.wl_query(integer), pg_temp.wl_ago(integer), pg_temp.wl_sold(bigint),
    pg_temp.wl_skewed(bigint, integer), pg_temp.wl_unit(bigint), pg_temp.wl_bits(bigint, integer),
    pg_temp.wl_hash(bigint, integer);
COMMIT;

ANALYZE categories, ai_accounts, seller_profiles, seller_products, seller_orders;
ANALYZE seller_order_events, search_history, popular_searches;
"""
