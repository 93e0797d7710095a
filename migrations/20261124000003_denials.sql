-- Denied calls join the audit trail (DESIGN.md §5). They are recorded off the hot path in
-- batches, so they are not written in the statement of a state change: they change no
-- state, carry no session version, and say why the call was denied.

ALTER TABLE arbiter.session_events
    ADD COLUMN reason text,
    ALTER COLUMN session_version DROP NOT NULL;

ALTER TABLE arbiter.session_events
    DROP CONSTRAINT session_events_kind_known,
    ADD CONSTRAINT session_events_kind_known CHECK (kind IN
        ('created', 'call_allowed', 'batch_allowed', 'closed', 'expired', 'reconciled', 'denied')),
    ADD CONSTRAINT session_events_reason_iff_denied CHECK
        ((kind = 'denied') = (reason IS NOT NULL)),
    ADD CONSTRAINT session_events_reason_known CHECK (reason IN
        ('agent_mismatch', 'closed', 'expired', 'budget', 'tool', 'rate', 'write_through',
         'invalid')),
    ADD CONSTRAINT session_events_version_unless_denied CHECK
        ((kind = 'denied') = (session_version IS NULL));

COMMENT ON COLUMN arbiter.session_events.reason IS
    'Why a call was denied (kind = denied only): agent_mismatch, closed, expired, budget, tool, rate, write_through, invalid.';
