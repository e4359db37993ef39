-- Migration 005 kept the deadline's two forms together when opened_at or max_duration_hours
-- moved by hand; one that moves expires_at alone (the sweeper's column: "give the crew two
-- more hours") left the record path judging by the old opened_at + max_duration_hours, and the
-- session then closed with a closedAt in the future. Now max_duration_hours follows it, so
-- there is one deadline whichever column is edited. And closed_at or close_reason edited by hand
-- (the end of a late-sync window, expired or closed) bump the version as a status change does.

CREATE OR REPLACE FUNCTION hydrobit_session_hand_edit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at
       AND (NEW.opened_at IS DISTINCT FROM OLD.opened_at
            OR NEW.max_duration_hours IS DISTINCT FROM OLD.max_duration_hours) THEN
        NEW.expires_at := NEW.opened_at + make_interval(secs => NEW.max_duration_hours * 3600);
    ELSIF NEW.expires_at IS DISTINCT FROM OLD.expires_at
          AND NEW.opened_at IS NOT DISTINCT FROM OLD.opened_at
          AND NEW.max_duration_hours IS NOT DISTINCT FROM OLD.max_duration_hours THEN
        -- ("end it now" on a session opened a moment ago may put expires_at before opened_at:
        -- a duration of a few milliseconds then, past as the other)
        NEW.max_duration_hours := greatest(
            extract(epoch FROM NEW.expires_at - NEW.opened_at)::double precision / 3600, 1e-6);
    END IF;
    IF NEW.version = OLD.version
       AND (NEW.expires_at IS DISTINCT FROM OLD.expires_at
            OR NEW.status IS DISTINCT FROM OLD.status
            OR NEW.closed_at IS DISTINCT FROM OLD.closed_at
            OR NEW.close_reason IS DISTINCT FROM OLD.close_reason
            OR NEW.owner_id IS DISTINCT FROM OLD.owner_id
            OR NEW.company_id IS DISTINCT FROM OLD.company_id) THEN
        NEW.version := OLD.version + 1;
        NEW.state_tick := nextval('session_state_tick');
        NEW.state_xid := pg_current_xact_id()::text::bigint;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER production_sessions_hand_edit ON production_sessions;
CREATE TRIGGER production_sessions_hand_edit
    BEFORE UPDATE OF opened_at, max_duration_hours, expires_at, status, closed_at, close_reason,
        owner_id, company_id
    ON production_sessions
    FOR EACH ROW EXECUTE FUNCTION hydrobit_session_hand_edit();

DROP TRIGGER production_sessions_version_changed ON production_sessions;
CREATE TRIGGER production_sessions_version_changed
    AFTER UPDATE OF version, opened_at, max_duration_hours, expires_at, status, closed_at,
        close_reason, owner_id, company_id
    ON production_sessions
    FOR EACH ROW WHEN (OLD.version IS DISTINCT FROM NEW.version)
    EXECUTE FUNCTION hydrobit_session_changed();
