-- Partial per-minute aggregates of one decoded batch.
-- Input table `batch`: the events of the batch that count towards their window
-- (on time or late within allowed lateness), with their `window_start` bin.
-- Output: one mergeable partial row per (source partition, window_start, service); the window
-- stage merges partials across batches (and instances) before minute_stats.sql.
SELECT
    src_partition,
    window_start,
    service,
    count(*)                                                   AS requests,
    sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END)             AS errors,
    sum(CASE WHEN status >= 400 AND status < 500 THEN 1 ELSE 0 END) AS client_errors,
    coalesce(sum(latency_ms), 0.0)                             AS latency_sum_ms,
    count(latency_ms)                                          AS latency_count,
    max(latency_ms)                                            AS latency_max_ms,
    hdr_sketch(latency_ms)                                     AS latency_hist,
    hll_sketch(user_id)                                        AS users_hll,
    sum(CASE WHEN event_type = 'view' THEN 1 ELSE 0 END)       AS views,
    sum(CASE WHEN event_type = 'cart' THEN 1 ELSE 0 END)       AS carts,
    sum(CASE WHEN event_type = 'purchase' THEN 1 ELSE 0 END)   AS purchases,
    sum(CASE WHEN event_type = 'rating' THEN 1 ELSE 0 END)     AS ratings
FROM batch
GROUP BY src_partition, window_start, service
