-- Migration 005 kept the deadline's two forms together when opened_at or max_duration_hours
-- moved by hand; one that moves expires_at alone (the sweeper's column: "give the crew two
-- more hours") left the record path judging by the old opened_at + max_duration_hours, and the
-- session then closed with a closedAt in the future. Now max_duration_hours follows it, so
-- there is one deadline whichever column is edited (an expires_at at or before opened_at is
-- refused by the max_duration_hours > 0 check).

CREATE OR REPLACE FUNCTION hydrobit_session_hand_edit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at
       AND (NEW.opened_at IS DISTINCT FROM OLD.opened_at
            OR NEW.max_duration_hours IS DISTINCT FROM OLD.max_duration_hours) THEN
        NEW.expires_at := NEW.opened_at + make_interval(secs => NEW.max_duration_hours * 3600);
    ELSIF NEW.expires_at IS DISTINCT FROM OLD.expires_at
          AND NEW.opened_at IS NOT DISTINCT FROM OLD.opened_at
          AND NEW.max_duration_hours IS NOT DISTINCT FROM OLD.max_duration_hours THEN
        NEW.max_duration_hours :=
            extract(epoch FROM NEW.expires_at - NEW.opened_at)::double precision / 3600;
    END IF;
    IF NEW.version = OLD.version
       AND (NEW.expires_at IS DISTINCT FROM OLD.expires_at
            OR NEW.status IS DISTINCT FROM OLD.status
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
