-- Secrets the server makes for itself on first start and every instance reads from here.
-- metadata-salt keys the digests below and the rate-limit counters' keys: whoever reads
-- Redis, or a copy of the sent-message records, cannot test guesses against them.
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- A duplicate-send record keeps a keyed digest of the sender and the message id instead of
-- the sender's id: enough to answer a resend, and records of one sender cannot be linked.
-- Records written before this version hold the plain sender id; a resend of such a message
-- (within its TTL) is refused as DUPLICATE_ID rather than acknowledged again.
ALTER TABLE sent_messages RENAME COLUMN sender_id TO sender_digest;
