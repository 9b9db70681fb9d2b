-- Sealed sender: each account's unidentified-access key (base64 of 16 bytes), which a sealed
-- send to the account must present, unless the account takes sealed messages from anyone
-- (`unrestricted`). No row, or a NULL key without `unrestricted`: sealed sends are refused.
CREATE TABLE unidentified_access (
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    access_key TEXT,
    unrestricted BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL
);
