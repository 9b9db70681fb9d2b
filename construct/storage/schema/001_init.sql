-- Accounts, sessions, key bundles, and the SQL inbox used when no Redis is configured.
-- Times are integer milliseconds since the epoch; ids are canonical lower-case UUID strings.

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Only a SHA-256 of each session token is stored.
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

-- The seed's UploadableKeyBundle, stored exactly as uploaded (base64 strings).
CREATE TABLE key_bundles (
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    master_identity_key TEXT NOT NULL,
    bundle_data TEXT NOT NULL,
    signature TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Per-recipient FIFO by seq; a row lives until the recipient acknowledges it or it expires.
CREATE TABLE inbox (
    seq {serial_primary_key},
    recipient_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    accepted_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX inbox_by_recipient ON inbox (recipient_id, seq);
CREATE UNIQUE INDEX inbox_by_message ON inbox (recipient_id, message_id);
CREATE INDEX inbox_by_expiry ON inbox (expires_at);
CREATE INDEX inbox_by_age ON inbox (accepted_at);

-- Remembers accepted message ids until they expire, so a resent id is acknowledged again
-- but never delivered twice, even after the recipient has acknowledged the first copy.
CREATE TABLE sent_messages (
    recipient_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (recipient_id, message_id)
);
CREATE INDEX sent_messages_by_expiry ON sent_messages (expires_at);
