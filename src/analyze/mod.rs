//! After training: reading runs back, comparing, evaluating, predicting, reporting
//! and benchmarking.

pub mod bench;
pub mod compare;
pub mod evaluate;
pub mod inspect;
pub mod predict;
pub mod report;
