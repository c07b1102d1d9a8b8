//! The HTTP side of a delivery: the request ([`request`], every refusal
//! before sending and the exact documented body), the client that sends it
//! ([`client`]: deadlines, body cap, TLS), the destinations it may reach
//! ([`guard`]), the signature ([`sign`]), and the judgement of the answer
//! ([`classify`], pure).

pub mod classify;
pub mod client;
pub mod guard;
pub mod request;
pub mod sign;
