-- X3DH one-time prekeys: uploaded in batches by their owner, handed out at most one per key
-- fetch and deleted in the same statement that hands it out. `key_id` is the owner's id for
-- the key (0 to 2^32 - 2); `public_key` is the base64 string as uploaded.
CREATE TABLE one_time_prekeys (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key_id BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    uploaded_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, key_id)
);
