-- A session's bearer token, for the paths where the agent itself presents the session
-- (the MCP proxy, `/mcp`): the token binds the session and its agent, so no agent header
-- is believed there. The token is `arb_<session id>_<secret>`, issued once at creation;
-- only SHA-256 of its secret is kept, so the database holds nothing that authenticates.
-- A session created without a token (the library's plain create) has none, and no
-- token authenticates for it. The digest never changes after the insert.

ALTER TABLE arbiter.sessions
    ADD COLUMN token_digest bytea,
    ADD CONSTRAINT sessions_token_digest_sha256
        CHECK (token_digest IS NULL OR octet_length(token_digest) = 32);

COMMENT ON COLUMN arbiter.sessions.token_digest IS
    'SHA-256 of the secret of the session''s bearer token (issued once at creation, never stored); NULL: the session has no token.';

CREATE FUNCTION arbiter.sessions_token_digest_fixed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    IF NEW.token_digest IS DISTINCT FROM OLD.token_digest THEN
        RAISE EXCEPTION 'a session''s token digest never changes'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'sessions_token_digest_fixed';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER sessions_token_digest_fixed
    BEFORE UPDATE OF token_digest ON arbiter.sessions
    FOR EACH ROW EXECUTE FUNCTION arbiter.sessions_token_digest_fixed();
