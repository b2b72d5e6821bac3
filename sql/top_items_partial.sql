-- Requests per item per window in one decoded batch (same input as
-- minute_partials.sql); merged across batches, the window keeps the top N.
SELECT src_partition, window_start, item_id, count(*) AS requests
FROM batch
WHERE item_id IS NOT NULL
GROUP BY src_partition, window_start, item_id
