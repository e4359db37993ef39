-- Session events keep their data exactly as the gateway wrote it.
--
-- jsonb stores an object's keys sorted by length and then bytes, so an event read back from
-- the outbox reached subscribers as {"day", "bonus", "notes", ...} while the same session's
-- get reply and retained state read {"sessionId", "companyId", ...}. The outbox only stores
-- and returns the document (no query looks inside it), so json, which keeps the text as
-- written, is the right type. Existing rows keep the order jsonb gave them.
ALTER TABLE session_events ALTER COLUMN data TYPE json USING data::json;
