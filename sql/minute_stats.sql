-- Final per-minute statistics per service.
-- Input table `partials`: merged partial aggregates (schema of
-- minute_partials.sql), one or more rows per (src_partition, window_start,
-- service); rows of the same key are merged here, exactly (a caller merging
-- across source partitions passes one src_partition, e.g. -1, for all rows):
-- counts add up and HDR histograms / HLL sketches merge.
SELECT
    window_start,
    service,
    requests,
    errors,
    client_errors,
    CASE WHEN requests > 0 THEN CAST(errors AS DOUBLE) / requests ELSE 0.0 END AS error_rate,
    CASE WHEN latency_count > 0 THEN latency_sum_ms / latency_count END       AS latency_mean_ms,
    hdr_quantile(latency_hist, 0.50)                                          AS latency_p50_ms,
    hdr_quantile(latency_hist, 0.95)                                          AS latency_p95_ms,
    hdr_quantile(latency_hist, 0.99)                                          AS latency_p99_ms,
    latency_max_ms,
    hll_count(users_hll)                                                      AS unique_users,
    src_partition
FROM (
    SELECT
        src_partition,
        window_start,
        service,
        sum(requests)        AS requests,
        sum(errors)          AS errors,
        sum(client_errors)   AS client_errors,
        sum(latency_sum_ms)  AS latency_sum_ms,
        sum(latency_count)   AS latency_count,
        max(latency_max_ms)  AS latency_max_ms,
        hdr_merge(latency_hist) AS latency_hist,
        hll_merge(users_hll)    AS users_hll
    FROM partials
    GROUP BY src_partition, window_start, service
) merged
ORDER BY window_start, service, src_partition
