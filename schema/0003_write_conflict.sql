-- A batch reads its users, decides in the relay, then writes everything in one statement. That statement
-- calls this function when a user it meant to change was changed by another writer in between; the error
-- (SQLSTATE 40001, serialization_failure) rolls the whole statement back, and the relay runs the batch again
-- from fresh facts.

CREATE FUNCTION relay_write_conflict() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a user changed between the batch''s read and its write; the batch is run again'
        USING ERRCODE = 'serialization_failure';
END
$$;
