//! The payloads outboxd knows: the Payment Cancellation webhook's body,
//! checked the way the enqueue function checks it.

use serde::Deserialize;

/// The event type of the Payment Cancellation webhook.
pub const PAYMENT_CANCELLATION: &str = "payment.cancellation";

/// The Payment Cancellation webhook body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PaymentCancellation {
    pub company_id: i64,
    pub payment_id: i64,
    pub payment_number: String,
    #[serde(default)]
    pub order_ids: Option<String>,
}

impl PaymentCancellation {
    /// Parses and checks a stored payload the way the enqueue function would
    /// have; `company_id` is the event's own column, which the payload must
    /// match so one tenant's event never reaches another tenant's endpoint.
    pub fn parse(payload: &str, company_id: i64) -> Result<Self, String> {
        // serde also reads a struct from a JSON array of its fields in
        // order, so `[6316, 1, "1"]` would pass and go out re-rendered as an
        // object. The contract's payload is an object; anything else is a
        // row written around the enqueue functions.
        if !payload.trim_start().starts_with('{') {
            return Err("the payload is not a JSON object".into());
        }
        let p: PaymentCancellation = serde_json::from_str(payload)
            .map_err(|e| format!("not a payment cancellation ({e})"))?;
        if p.company_id <= 0 {
            return Err("companyId must be positive".into());
        }
        if p.company_id != company_id {
            return Err(format!(
                "companyId {} does not match the event's company_id {company_id}",
                p.company_id
            ));
        }
        if p.payment_id <= 0 {
            return Err("paymentId must be positive".into());
        }
        if p.payment_number.trim().is_empty() {
            return Err("paymentNumber is blank".into());
        }
        if let Some(ids) = &p.order_ids {
            let valid = !ids.is_empty()
                && ids.split(',').all(|id| {
                    !id.is_empty() && !id.starts_with('0') && id.bytes().all(|b| b.is_ascii_digit())
                });
            if !valid {
                return Err("orderIds must be comma-separated order ids".into());
            }
        }
        Ok(p)
    }

    /// The body exactly as documented, `orderIds` only when present.
    pub fn render(&self) -> String {
        // serde_json quotes and escapes the one free-text field.
        let number = serde_json::to_string(&self.payment_number).expect("a string serializes");
        let mut out = format!(
            "{{\"companyId\": {}, \"paymentId\": {}, \"paymentNumber\": {number}",
            self.company_id, self.payment_id
        );
        if let Some(ids) = &self.order_ids {
            out.push_str(", \"orderIds\": \"");
            out.push_str(ids); // digits and commas only, checked in parse
            out.push('"');
        }
        out.push('}');
        out
    }
}
