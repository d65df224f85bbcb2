//! `cascade auth`: make API keys. A key is printed once; nodes keep only its SHA-256.

use crate::cli::exit;
use crate::cli::render::{self, Output, Record};
use cascade_node::auth::{key_hash, new_key, Role};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Make a new API key with a name and roles; prints the key (keep it secret) and the
    /// `[[auth.api_keys]]` entry to add to every node's configuration.
    NewKey {
        /// Name of the key (recorded as the actor of its revocations).
        #[arg(long)]
        name: String,
        /// A role: gateway, idp, responder or admin (repeat for several).
        #[arg(long = "role", required = true)]
        roles: Vec<Role>,
    },
}

pub fn run(out: Output, what: AuthCommand) -> anyhow::Result<u8> {
    match what {
        AuthCommand::NewKey { name, roles } => {
            let bad_name = name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic());
            if bad_name {
                return Err(
                    exit::Usage(format!("--name {name:?} must be 1-64 printable ASCII characters")).into()
                );
            }
            let key = new_key();
            let hash = key_hash(&key);
            let role_list: Vec<String> = roles.iter().map(|r| format!("{:?}", r.name())).collect();
            let toml = format!(
                "[[auth.api_keys]]\nname = {name:?}\nsha256 = \"{hash}\"\nroles = [{}]",
                role_list.join(", ")
            );
            match out {
                Output::Table => {
                    println!("key (shown once): {key}");
                    println!("\nadd to every node's configuration:\n\n{toml}");
                }
                _ => {
                    let roles: Vec<&str> = roles.iter().map(|r| r.name()).collect();
                    let rec = Record::new()
                        .with("name", name)
                        .with("key", key)
                        .with("sha256", hash)
                        .with("roles", roles.join(","));
                    render::emit(out, &rec);
                }
            }
            Ok(exit::SUCCESS)
        }
    }
}
