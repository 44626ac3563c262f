//! Text forms pasted by people or read from the network: tickets, agent
//! ids, share ids and secret keys.
#![no_main]

use caravan_agent::identity::{AgentId, SecretKey};
use caravan_agent::manifest::{ShareId, Ticket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Ticket::parse(s);
    let _ = Ticket::parse(&format!("caravan-ticket-v1:{s}"));
    if let Ok(id) = s.parse::<AgentId>() {
        assert_eq!(id.to_string().parse::<AgentId>().ok(), Some(id));
    }
    if let Ok(id) = s.parse::<ShareId>() {
        assert_eq!(id.to_string().parse::<ShareId>().ok(), Some(id));
    }
    let _ = SecretKey::from_text(s);
});
