//! Anytime-valid (sequential) statistical tests for abgate's guard.
//!
//! The guard compares a control arm (base model) with a treatment arm
//! (fine-tuned model) every `interval_seconds` for the whole stage. Every
//! test here is valid *uniformly over looks*: with identical arms,
//! P(a check ever trips during the stage) ≤ its α, however many looks.
//!
//! * [`sketch`]: DDSketch quantile sketch (Masson, Rim, Lee, VLDB 2019).
//! * [`mean`]: two-sample asymptotic confidence sequences for differences
//!   and log-ratios of means and proportions (normal mixture / mSPRT).
//! * [`quantile`]: confidence sequences for a quantile (Howard & Ramdas,
//!   Bernoulli 2022) and for the ratio of two arms' quantiles.
//! * [`srm`]: anytime-valid sample-ratio-mismatch test (Lindon & Malek,
//!   NeurIPS 2022).
//! * [`decision`]: per-check state objects and verdicts used by the
//!   gateway and by `src/bin/simulate.rs`.
//! * [`math`]: ln Γ and boundary helpers; [`sim`]: PRNG for simulations.

pub mod decision;
pub mod math;
pub mod mean;
pub mod quantile;
pub mod sim;
pub mod sketch;
pub mod srm;
