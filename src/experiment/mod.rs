//! The experiment itself, free of I/O: which arm a user is in (the
//! reference hash, bit for bit), the ids that carry a request's arm, and
//! whether the arms get the share of users the split says.

pub mod assign;
pub mod hex;
pub mod request_id;
pub(crate) mod srm;
