-- Cache invalidation across gateway processes: each process caches session facts (owner,
-- state, deadline) and users' companies, and drops an entry when PostgreSQL says it changed.
-- The session trigger fires only when the admission version moves (close, expire, extend),
-- never on the totals updates of the hot path. Record inserts stay guarded by the version in
-- the database either way: a stale cache can delay a decision, never make a wrong one commit.

CREATE FUNCTION hydrobit_session_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hydrobit_sessions', NEW.session_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER production_sessions_version_changed
    AFTER UPDATE OF version ON production_sessions
    FOR EACH ROW WHEN (OLD.version IS DISTINCT FROM NEW.version)
    EXECUTE FUNCTION hydrobit_session_changed();

CREATE FUNCTION hydrobit_user_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('hydrobit_users', OLD.auth0_id);
    ELSE
        PERFORM pg_notify('hydrobit_users', NEW.auth0_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_changed
    AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION hydrobit_user_changed();
