-- The change feed: every statement that writes users calls this from inside itself (so it costs no round
-- trip of its own) with the users it wrote, and a listener on the channel `<schema>_users_changed` learns
-- which users each commit changed. NOTIFY is delivered at commit, so a write that rolls back announces
-- nothing. Each notice is a JSON array of {"user_id", "outcome"} ("applied", or "tombstoned" when the user is
-- now deleted), in user_id order. PostgreSQL refuses a payload of 8000 bytes or more: the changes are split
-- into notices that start a new one after 4000 bytes, and one change (a user id is at most 512 characters)
-- is far shorter than the rest of the room. A NULL channel announces nothing.
CREATE FUNCTION relay_announce_changes(channel text, user_ids text[], tombstoned boolean[]) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    WITH changes AS (
        SELECT user_id,
               json_build_object('user_id', user_id,
                                 'outcome', CASE WHEN gone THEN 'tombstoned' ELSE 'applied' END)::text AS change
          FROM unnest(user_ids, tombstoned) AS written(user_id, gone)
         WHERE channel IS NOT NULL
    ), placed AS (
        SELECT user_id, change,
               sum(octet_length(change) + 1) OVER (ORDER BY user_id) - octet_length(change) - 1 AS starts_at
          FROM changes
    ), notices AS (
        SELECT pg_notify(channel, '[' || string_agg(change, ',' ORDER BY user_id) || ']')
          FROM placed
         GROUP BY starts_at / 4000
    )
    SELECT count(*) FROM notices
$$;
