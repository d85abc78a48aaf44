-- RFC 3339 allows a UTC offset up to ±23:59, and the relay accepts any such time; PostgreSQL's timestamptz
-- input stops at ±15:59, so a profile time like 2025-01-01T00:00:00+16:00 was refused and its event set
-- aside. This reads every time the way the relay does: an offset beyond PostgreSQL's range is applied by
-- hand, anything else is PostgreSQL's own cast (NULL stays NULL).
CREATE FUNCTION relay_timestamptz(value text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN right(value, 6) ~ '^[+-](1[6-9]|2[0-3]):[0-5][0-9]$'
        THEN (left(value, -6) || 'Z')::timestamptz - right(value, 6)::interval
        ELSE value::timestamptz
    END
$$;

-- As in 0001, with the three times read through relay_timestamptz. The function is found on the search
-- path, as every relay connection sets it; a session of your own that writes `users` needs the relay's schema
-- on its search path too.
CREATE OR REPLACE FUNCTION users_derive_columns() RETURNS trigger LANGUAGE plpgsql AS $$
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
    NEW.created_at     := relay_timestamptz(NEW.profile ->> 'created_at');
    NEW.updated_at     := relay_timestamptz(NEW.profile ->> 'updated_at');
    NEW.last_login     := relay_timestamptz(NEW.profile ->> 'last_login');
    NEW.logins_count   := (NEW.profile ->> 'logins_count')::bigint;
    NEW.identities     := NULLIF(NEW.profile -> 'identities', 'null');
    NEW.app_metadata   := NULLIF(NEW.profile -> 'app_metadata', 'null');
    NEW.user_metadata  := NULLIF(NEW.profile -> 'user_metadata', 'null');
    RETURN NEW;
END
$$;
