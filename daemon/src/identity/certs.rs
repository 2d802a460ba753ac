//! `nodemesh certs`: a development CA and node certificates.
//!
//! STUB: the API below is the contract; bodies are filled in by the owner.

/// `nodemesh certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Placeholder.
    Init,
}

/// Certificate generation failures.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Placeholder.
    #[error("not implemented")]
    Unimplemented,
}

/// Runs a `nodemesh certs` subcommand.
pub fn run(_cmd: CertsCommand) -> Result<(), CertsError> {
    Err(CertsError::Unimplemented)
}
