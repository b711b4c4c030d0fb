-- Reference schema of the marketplace this operator was designed for (docs/architecture.md#reference-workload).
--
-- Only primary keys, foreign keys and one natural unique key are declared here. The targeted
-- indexes and the two materialized views are *not*: the MarketplaceDB resource in
-- examples/marketplacedb.yaml declares them and the operator creates them CONCURRENTLY.
-- Run on a fresh database; fill it with `python examples/generate.py --products N`.
-- The foreign keys are named: the data loader drops and re-adds them around its bulk insert.

CREATE TABLE categories (
    id            serial PRIMARY KEY,
    name          text        NOT NULL,
    slug          text        NOT NULL,
    icon          text,
    color         text,                       -- '#rrggbb'
    display_order integer     NOT NULL DEFAULT 0,
    is_active     boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Accounts of AI services sold by the marketplace itself (no seller).
CREATE TABLE ai_accounts (
    id           bigserial PRIMARY KEY,
    name         text          NOT NULL,
    description  text,
    price        numeric(12,2) NOT NULL CHECK (price >= 0),
    icon_url     text,
    category_id  integer,
    sold_count   integer       NOT NULL DEFAULT 0,
    view_count   integer       NOT NULL DEFAULT 0,
    rating       numeric(3,2),
    is_available boolean       NOT NULL DEFAULT true,
    created_at   timestamptz   NOT NULL DEFAULT now(),
    updated_at   timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT ai_accounts_category_id_fkey FOREIGN KEY (category_id) REFERENCES categories (id)
);

CREATE TABLE seller_profiles (
    id          bigserial PRIMARY KEY,
    user_id     bigint       NOT NULL,
    store_name  text         NOT NULL,
    store_slug  text         NOT NULL,
    description text,
    rating      numeric(3,2),
    is_verified boolean      NOT NULL DEFAULT false,
    created_at  timestamptz  NOT NULL DEFAULT now()
);

-- Products listed by third-party sellers; shown only once approved by moderation.
CREATE TABLE seller_products (
    id           bigserial PRIMARY KEY,
    seller_id    bigint        NOT NULL,
    category_id  integer,
    name         text          NOT NULL,
    description  text,
    price        numeric(12,2) NOT NULL CHECK (price >= 0),
    icon_url     text,
    stock        integer       NOT NULL DEFAULT 0,
    sold_count   integer       NOT NULL DEFAULT 0,
    view_count   integer       NOT NULL DEFAULT 0,
    rating       numeric(3,2),
    is_available boolean       NOT NULL DEFAULT true,
    is_approved  boolean       NOT NULL DEFAULT false,
    created_at   timestamptz   NOT NULL DEFAULT now(),
    updated_at   timestamptz   NOT NULL DEFAULT now(),
    -- Filterable attributes (delivery, language, license): SEARCH_QUERIES' JSONB filter.
    attributes   jsonb         NOT NULL DEFAULT '{}',
    CONSTRAINT seller_products_seller_id_fkey FOREIGN KEY (seller_id) REFERENCES seller_profiles (id),
    CONSTRAINT seller_products_category_id_fkey FOREIGN KEY (category_id) REFERENCES categories (id)
);

CREATE TABLE seller_orders (
    id         bigserial PRIMARY KEY,
    seller_id  bigint        NOT NULL,
    product_id bigint        NOT NULL,
    buyer_id   bigint        NOT NULL,
    quantity   integer       NOT NULL DEFAULT 1 CHECK (quantity > 0),
    amount     numeric(12,2) NOT NULL CHECK (amount >= 0),
    status     text          NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'paid', 'delivered', 'cancelled', 'refunded')),
    created_at timestamptz   NOT NULL DEFAULT now(),
    updated_at timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT seller_orders_seller_id_fkey FOREIGN KEY (seller_id) REFERENCES seller_profiles (id),
    CONSTRAINT seller_orders_product_id_fkey FOREIGN KEY (product_id) REFERENCES seller_products (id)
);

-- Append-only history of order status changes, partitioned by time (one partition per quarter and a
-- default one for anything outside them): old quarters are detached or dropped whole. PostgreSQL 15
-- cannot CREATE INDEX CONCURRENTLY on it: the operator builds ON ONLY the parent, then CONCURRENTLY
-- per partition, and attaches (idx_order_events_seller_recent in examples/marketplacedb.yaml).
CREATE TABLE seller_order_events (
    id         bigserial,
    order_id   bigint      NOT NULL,
    seller_id  bigint      NOT NULL,
    status     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE seller_order_events_2024q1 PARTITION OF seller_order_events
    FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-04-01 00:00:00+00');
CREATE TABLE seller_order_events_2024q2 PARTITION OF seller_order_events
    FOR VALUES FROM ('2024-04-01 00:00:00+00') TO ('2024-07-01 00:00:00+00');
CREATE TABLE seller_order_events_2024q3 PARTITION OF seller_order_events
    FOR VALUES FROM ('2024-07-01 00:00:00+00') TO ('2024-10-01 00:00:00+00');
CREATE TABLE seller_order_events_2024q4 PARTITION OF seller_order_events
    FOR VALUES FROM ('2024-10-01 00:00:00+00') TO ('2025-01-01 00:00:00+00');
CREATE TABLE seller_order_events_default PARTITION OF seller_order_events DEFAULT;

CREATE TABLE search_history (
    id            bigserial PRIMARY KEY,
    user_id       bigint      NOT NULL,
    query         text        NOT NULL,
    results_count integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per normalized query; the search service upserts on `query`.
CREATE TABLE popular_searches (
    id               bigserial PRIMARY KEY,
    query            text        NOT NULL UNIQUE,
    search_count     integer     NOT NULL DEFAULT 0,
    is_trending      boolean     NOT NULL DEFAULT false,
    last_searched_at timestamptz NOT NULL DEFAULT now()
);
