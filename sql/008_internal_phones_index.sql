-- 008: an enterprise's internal numbers, read by index.
--
-- Placing a call, smart redirect, the managers page and the extension picker each read one
-- enterprise's rows of the platform's user_internal_phones. Without an index that starts with
-- enterprise_number, each read scans the whole table (every enterprise's numbers): ~100,000
-- rows on a platform of 10,000 enterprises. The index is added only where the platform has
-- none of its own that starts with that column; nothing else of the table changes.

DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = 'user_internal_phones'::regclass
           AND a.attname = 'enterprise_number'
    ) THEN
        CREATE INDEX crm_user_internal_phones_enterprise
            ON user_internal_phones (enterprise_number, phone_number);
    END IF;
END
$$;
