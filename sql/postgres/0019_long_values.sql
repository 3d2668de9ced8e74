-- Param and tag values up to MLflow's own caps (6000 / 8000 characters), so whatever an MLflow
-- client or logger (Transformers' TrainingArguments, Lightning's hparams) logs fits. Forward-only.
--
-- The old CHECK (2048 bytes) kept values below btree's index-entry limit (~2700 bytes) because
-- (key, value) btree indexes served the listing's equality filters. Those indexes now hold the
-- value's md5 instead, whatever its length; the filters compare md5(value) first, then the value
-- itself (run_reads.py). 32000 bytes hold 8000 characters of any UTF-8.

ALTER TABLE run_params DROP CONSTRAINT run_params_value_check;
ALTER TABLE run_params ADD CONSTRAINT run_params_value_check CHECK (octet_length(value) <= 32000);
DROP INDEX run_params_key_value_idx;
CREATE INDEX run_params_key_value_md5_idx ON run_params (key, md5(value));

ALTER TABLE run_tags DROP CONSTRAINT run_tags_value_check;
ALTER TABLE run_tags ADD CONSTRAINT run_tags_value_check CHECK (octet_length(value) <= 32000);
DROP INDEX run_tags_key_value_idx;
CREATE INDEX run_tags_key_value_md5_idx ON run_tags (key, md5(value));

ALTER TABLE mlflow_experiment_tags DROP CONSTRAINT mlflow_experiment_tags_value_check;
ALTER TABLE mlflow_experiment_tags
    ADD CONSTRAINT mlflow_experiment_tags_value_check CHECK (octet_length(value) <= 32000);
