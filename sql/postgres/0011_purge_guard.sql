-- A run id whose purge job is not done cannot be used by any new run, whichever path inserts it
-- (metadata.init_run answers 409 run_deleting before it gets here; an import or any other
-- writer of `runs` is refused by this trigger): the purge deletes by run id, so a new run of
-- that id would lose its points to it. Forward-only, like every schema file here.
-- The function body keeps its statements on one line: schema files are split on ';' at line
-- ends (storage.migrations.split_statements).
CREATE FUNCTION refuse_run_id_being_purged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM purge_runs WHERE run_id = NEW.run_id) THEN RAISE EXCEPTION 'run % was deleted and is still being purged', NEW.run_id USING ERRCODE = 'MLR01'; END IF; RETURN NEW; END
$$;

CREATE TRIGGER runs_refuse_run_ids_being_purged BEFORE INSERT ON runs
    FOR EACH ROW EXECUTE FUNCTION refuse_run_id_being_purged();
