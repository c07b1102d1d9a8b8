-- 0007: a notification goes with its email.
--
-- Until now outbox.notifications.email_id was ON DELETE SET NULL. When the
-- retention cleanup deleted a sent email (retention.emails, 30 days by
-- default), its notifications became "not emailed yet" again, and the next
-- gather emailed the company a second time about failures it had been told
-- of: for every failed event still kept, a replayed one for instance.
-- Deleting an email now deletes its notifications: what they were for is
-- done. (Notifications not emailed yet have no email and are not touched.)
--
-- NOT VALID: every existing row was checked by the constraint this one
-- replaces, so nothing is scanned; new and updated rows are checked, and
-- the ON DELETE action applies to all rows alike. The brief lock is on
-- outboxd's own tables; the sales application's enqueue does not touch
-- them.
ALTER TABLE outbox.notifications
    DROP CONSTRAINT notifications_email_fk,
    ADD CONSTRAINT notifications_email_fk FOREIGN KEY (email_id)
        REFERENCES outbox.emails (id) ON DELETE CASCADE NOT VALID;
