-- mark_email_recipient: recipient $3 of email $1 (claimed at attempt $2)
-- accepted it. Written the moment the SMTP server says so, before the next
-- recipient's transaction starts, so that an exchange cut off later (a
-- stop's grace, a crash, the bound on the whole exchange) never mails them
-- again: the claim that takes the email next reads sent_to. Fenced like
-- mark_email.sql, which writes the whole outcome at the end.
UPDATE outbox.emails
   SET sent_to = CASE WHEN $3::text = ANY (sent_to) THEN sent_to ELSE sent_to || $3::text END
 WHERE id = $1 AND state = 'sending' AND attempts = $2
