//! Evaluation and benchmark tools, apart from the pipeline: the Kafka-path
//! benchmarks of `pulse bench --kafka` ([`bench`]), the NAB scorer
//! ([`nab`]), the detector run over CSV series behind `pulse detect`
//! ([`detect_csv`]) with its leave-one-category-out evaluation ([`loco`]),
//! and the prequential recommendation evaluation behind
//! `pulse reco-eval` ([`reco`]). They use the pipeline's modules; nothing in
//! the pipeline uses them.

pub mod bench;
pub mod detect_csv;
pub mod loco;
pub mod nab;
pub mod reco;
