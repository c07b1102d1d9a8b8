-- 0014: where an endpoint's requests go, for the cap per destination.
--
-- A destination is the URL's host, lower-case, and its port (80 or 443 by
-- the scheme when the URL names none): https://hooks.vendor.example/a and
-- https://HOOKS.vendor.example:443/b are one destination, however many
-- companies and event types point at it. Nothing is resolved: two names of
-- one server are two destinations. outboxd keeps the requests in flight to
-- one destination under `delivery.destination_concurrency` per instance
-- unless it answers quickly (README, "Many tenants, one queue").
--
-- Stored, computed by PostgreSQL from the url whenever a row is written:
-- the claims read it by primary key with the rest of the endpoint, instead
-- of taking the url apart for every row they lease, and the daemon uses
-- the same string. The url is valid by its constraint (an http or https
-- scheme, a host name or a bracketed IPv6 address, an optional port, no
-- credentials), so string functions take it apart: the authority is what
-- lies between "://" and the first "/", "?" or "#"; it has a port when it
-- holds a ":" and does not end with the "]" of an IPv6 address.
--
-- Online enough: adding a stored generated column rewrites outbox.endpoints
-- (one row per company and event type) under an exclusive lock for the
-- moment that takes. The enqueue never reads this table; claims and the
-- settings screen wait that moment (`outboxd migrate` waits for the lock at
-- most briefly at a time: lock_timeout). A daemon of the previous version
-- does not read the column and keeps working; writers name their columns
-- (the column cannot be written, only computed).

ALTER TABLE outbox.endpoints
    ADD COLUMN destination text GENERATED ALWAYS AS (
        lower(split_part(split_part(split_part(split_part(url, '://', 2), '/', 1), '?', 1), '#', 1))
        || CASE WHEN split_part(split_part(split_part(split_part(url, '://', 2), '/', 1), '?', 1), '#', 1) LIKE '%]'
                  OR split_part(split_part(split_part(split_part(url, '://', 2), '/', 1), '?', 1), '#', 1) NOT LIKE '%:%'
                THEN CASE WHEN lower(left(url, 6)) = 'https:' THEN ':443' ELSE ':80' END
                ELSE '' END
    ) STORED;

COMMENT ON COLUMN outbox.endpoints.destination IS
    'Where its requests go: the url''s host (lower-case) and port (by scheme if none). Computed; outboxd caps requests in flight per destination.';
