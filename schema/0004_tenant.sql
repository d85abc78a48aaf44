-- The one Auth0 tenant whose users this schema holds: the first tenant (`a0tenant`) to deliver an event.
-- The relay refuses events that name any other tenant, because a user id is only unique within a tenant
-- (a social login has the same `google-oauth2|…` id in every tenant that uses it), so two tenants' users in
-- one table would be merged into one another. Point each tenant at a schema of its own (RELAY_DB_SCHEMA).

CREATE TABLE tenant (
    name      text PRIMARY KEY,
    pinned_at timestamptz NOT NULL DEFAULT now()
);

-- At most one row.
CREATE UNIQUE INDEX tenant_one_row ON tenant ((true));

COMMENT ON TABLE tenant IS 'The Auth0 tenant whose users this schema holds; events naming another tenant are refused.';
