//! What operator tools and the broker read from a running lmbus cluster, below both: the
//! master's status view (requested on its status subject) with the table every tool
//! prints, who holds which seat (`seats`), and a JetStream stream's stored messages (the alert stream for the usage report
//! and the audit). The monitor renders and tails; the broker writes reports; neither
//! depends on the other.

mod seats;
mod status;
mod stored;

pub use seats::{SeatFilter, SeatList, SeatRow, fetch_seats, held_for, render_seats, since_text};
pub use status::{
    StatusError, context_shown, explain_no_master, fetch_agents, fetch_status, license_summary,
    printable_status, render_status, replicas_up, silence_text, slave_cells, state_word,
    sync_summary,
};
pub use stored::{FLOW_CONTROL_HINT, Stored, StoredError, stored, stored_each, stored_matching};
