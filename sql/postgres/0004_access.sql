-- Access and artifacts (mlrun.server.auth, mlrun.server.storage.keys, mlrun.server.artifacts).
-- Forward-only, like every schema file here.
--
-- API keys: the scopes and the name get the same limits the server checks, so a row written by
-- any other path cannot hold a scope the server does not understand.
--
-- Artifacts: the size a client declared when it asked for an upload URL, kept apart from
-- size_bytes (the verified size, set at finalize) so that "declared 0 bytes" and "declared
-- nothing" stay different.

ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_known
    CHECK (cardinality(scopes) >= 1 AND scopes <@ ARRAY['read', 'write', 'admin']::text[]);

ALTER TABLE api_keys ADD CONSTRAINT api_keys_name_length CHECK (octet_length(name) <= 400);

ALTER TABLE artifacts
    ADD COLUMN declared_size_bytes bigint CHECK (declared_size_bytes >= 0);
