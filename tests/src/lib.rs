//! The integration-test harness, one concept per module, all re-exported here so a test
//! says `use lmbus_tests::*`: `nats` (real `nats-server` processes and clusters on free
//! ports with temp store dirs, killed on drop), `vendor` (a key pair and the licenses it
//! signs), `broker` (an in-process broker), `process` (the built binaries as child
//! processes that tests signal), `observe` (alerts, status), `fixture` (what most
//! tests start from, the tracing set-up and the seat-invariant poller), `wait` (the bound
//! on every wait); `books` (the hosts' books of in-process slaves, checked against the
//! license at every approval), `daemon`, `ha`, `node_loss` and `catch_up` for the tests and
//! benches that need them; `bench` (the runtime and trial count every bench shares); `http1` (reading a raw HTTP/1.1 answer, for pipelined requests); `dashboard` (the web dashboard in-process, and an HTTP client
//! with cookies).
//!
//! Nothing here mocks NATS. Every wait is bounded.

pub mod bench;
pub mod books;
pub mod catch_up;
pub mod daemon;
pub mod dashboard;
pub mod ha;
pub mod http1;
pub mod jwt;
pub mod node_loss;

mod broker;
mod fixture;
mod nats;
mod observe;
mod process;
mod vendor;
mod wait;

pub use broker::*;
pub use fixture::*;
pub use nats::*;
pub use observe::*;
pub use process::*;
pub use vendor::*;
pub use wait::*;
