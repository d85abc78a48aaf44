-- Least privilege for the relay: a migration role that owns the relay's schema, and a runtime role that can
-- only read and write the rows of the relay's tables. Run it once, for a new schema, as a superuser (or a
-- role with CREATEROLE that may create schemas), connected to the relay's database:
--
--   psql "$ADMIN_DATABASE_URL" -X -v ON_ERROR_STOP=1 \
--        -v schema=auth0 -v migrator=relay_migrator -v runtime=relay_runtime \
--        -v migrator_password="$MIGRATOR_PASSWORD" -v runtime_password="$RUNTIME_PASSWORD" \
--        -f docs/least-privilege.sql
--
-- Then migrate as the migration role (at each upgrade), and run everything else as the runtime role:
--
--   DATABASE_URL=postgresql://relay_migrator:…@host/db RELAY_DB_SCHEMA=auth0 relay migrate
--   DATABASE_URL=postgresql://relay_runtime:…@host/db  RELAY_DB_SCHEMA=auth0 relay serve
--
-- tests/test_least_privilege.py runs this file against PostgreSQL 15 and 18 and serves events as the
-- runtime role.

BEGIN;

CREATE ROLE :"migrator" LOGIN PASSWORD :'migrator_password';
CREATE ROLE :"runtime" LOGIN PASSWORD :'runtime_password';

-- The migration role owns the schema, so it owns every table a migration creates, and it alone can alter or
-- drop them. `relay migrate` runs CREATE SCHEMA IF NOT EXISTS, which PostgreSQL checks against the
-- database's CREATE privilege even when the schema exists; hence the grant.
CREATE SCHEMA :"schema" AUTHORIZATION :"migrator";
GRANT CONNECT, CREATE ON DATABASE :"DBNAME" TO :"migrator";

-- The runtime role (relay serve, dead-letters, prune, backfill, catch-up): rows only. USAGE without CREATE
-- on the schema, so it can neither create, alter nor drop anything in it. TEMPORARY because the backfill
-- stages export rows in a temporary table.
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"runtime";
GRANT USAGE ON SCHEMA :"schema" TO :"runtime";

-- Every table and sequence the migration role creates in the schema from now on, by this version's
-- migrations and future ones alike, is readable and writable by the runtime role without another grant.
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA :"schema"
    GRANT USAGE, SELECT ON SEQUENCES TO :"runtime";

COMMIT;
