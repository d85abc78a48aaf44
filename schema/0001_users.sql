-- The copy of Auth0 users, the ledger of processed events, and the dead letters.
-- Runs inside the relay's schema (search_path is set by the migrator); forward-only.

CREATE TABLE users (
    user_id              text PRIMARY KEY,
    email                text,
    email_verified       boolean,
    name                 text,
    given_name           text,
    family_name          text,
    nickname             text,
    picture              text,
    username             text,
    phone_number         text,
    blocked              boolean,
    created_at           timestamptz,
    updated_at           timestamptz,
    last_login           timestamptz,
    logins_count         bigint,
    identities           jsonb,
    app_metadata         jsonb,
    user_metadata        jsonb,
    -- data.object as known: every field Auth0 sent, unknown ones included.
    profile              jsonb NOT NULL DEFAULT '{}',
    -- Version of the newest event applied: its time, then its id to break ties.
    last_event_processed timestamptz,
    last_event_id        text,
    -- Set by user.deleted (a tombstone: the row stays so late, older events cannot revive the user).
    deleted_at           timestamptz,
    -- Per-field versions that make merging independent of delivery order (see relay/handlers.py).
    merge_state          jsonb NOT NULL DEFAULT '{}'
);

COMMENT ON TABLE users IS 'Auth0 user profiles, kept in step by the relay; deleted users are tombstones (deleted_at set).';

-- The typed columns are derived from the profile in one place, for every writer (events, backfill).
CREATE FUNCTION users_derive_columns() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.email          := NEW.profile ->> 'email';
    NEW.email_verified := (NEW.profile ->> 'email_verified')::boolean;
    NEW.name           := NEW.profile ->> 'name';
    NEW.given_name     := NEW.profile ->> 'given_name';
    NEW.family_name    := NEW.profile ->> 'family_name';
    NEW.nickname       := NEW.profile ->> 'nickname';
    NEW.picture        := NEW.profile ->> 'picture';
    NEW.username       := NEW.profile ->> 'username';
    NEW.phone_number   := NEW.profile ->> 'phone_number';
    NEW.blocked        := (NEW.profile ->> 'blocked')::boolean;
    NEW.created_at     := (NEW.profile ->> 'created_at')::timestamptz;
    NEW.updated_at     := (NEW.profile ->> 'updated_at')::timestamptz;
    NEW.last_login     := (NEW.profile ->> 'last_login')::timestamptz;
    NEW.logins_count   := (NEW.profile ->> 'logins_count')::bigint;
    NEW.identities     := NULLIF(NEW.profile -> 'identities', 'null');
    NEW.app_metadata   := NULLIF(NEW.profile -> 'app_metadata', 'null');
    NEW.user_metadata  := NULLIF(NEW.profile -> 'user_metadata', 'null');
    RETURN NEW;
END
$$;

CREATE TRIGGER users_derive_columns
    BEFORE INSERT OR UPDATE OF profile ON users
    FOR EACH ROW EXECUTE FUNCTION users_derive_columns();

-- What the copy is for: look-ups by email, metadata containment, identity provider and connection.
CREATE INDEX users_email_lower_idx ON users (lower(email));
CREATE INDEX users_app_metadata_idx ON users USING gin (app_metadata jsonb_path_ops);
CREATE INDEX users_user_metadata_idx ON users USING gin (user_metadata jsonb_path_ops);
-- Serves identities @> '[{"provider": "google-oauth2"}]' and '[{"connection": "..."}]'.
CREATE INDEX users_identities_idx ON users USING gin (identities jsonb_path_ops);
CREATE INDEX users_updated_at_idx ON users (updated_at);

CREATE VIEW live_users AS
    SELECT * FROM users WHERE deleted_at IS NULL;

COMMENT ON VIEW live_users IS 'Users that exist in Auth0 now (no tombstone).';

CREATE TABLE processed_events (
    event_id    text PRIMARY KEY,
    event_type  text NOT NULL,
    user_id     text,
    event_time  timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL
        CHECK (outcome IN ('applied', 'tombstoned', 'stale', 'test', 'ignored'))
);

CREATE INDEX processed_events_user_idx ON processed_events (user_id, event_time);
CREATE INDEX processed_events_received_idx ON processed_events (received_at);

CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route       text NOT NULL,
    body        bytea NOT NULL,
    -- Request headers worth keeping for diagnosis; credentials and signatures are never stored.
    headers     jsonb NOT NULL DEFAULT '{}',
    error       text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);

CREATE INDEX dead_letters_unresolved_idx ON dead_letters (received_at) WHERE resolved_at IS NULL;
