//! Flags (and their environment variables) that shape the pod's redirect rules.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::Parser;

/// Ebb's own ports (admin, metrics, health), never captured inbound whatever the flags say.
pub const PROXY_OWN_PORTS: [u16; 3] = [15000, 15020, 15021];

/// Everything sidecar-init needs to know, from flags or `EBB_INIT_*` environment variables.
#[derive(Debug, Clone, Parser)]
#[command(version, about = "Redirects a pod's TCP traffic to the Ebb proxy with iptables, then exits")]
pub struct Config {
    /// UID the proxy runs as; its own traffic is never captured.
    #[arg(long, env = "EBB_INIT_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID the proxy runs as; its own traffic is never captured.
    #[arg(long, env = "EBB_INIT_PROXY_GID", default_value_t = 1337)]
    pub proxy_gid: u32,
    /// Port the proxy accepts captured inbound traffic on.
    #[arg(long, env = "EBB_INIT_INBOUND_PORT", default_value_t = 15006, value_parser = port)]
    pub inbound_port: u16,
    /// Port the proxy accepts captured outbound traffic on.
    #[arg(long, env = "EBB_INIT_OUTBOUND_PORT", default_value_t = 15001, value_parser = port)]
    pub outbound_port: u16,
    /// Inbound destination ports to capture: `*` or a comma list.
    #[arg(long, env = "EBB_INIT_INBOUND_PORTS", default_value = "*", value_parser = scope::<u16>)]
    pub inbound_ports: Scope<u16>,
    /// Inbound ports never captured, on top of 15000, 15020 and 15021.
    #[arg(long, env = "EBB_INIT_EXCLUDE_INBOUND_PORTS", default_value = "", value_parser = list::<u16>)]
    pub exclude_inbound_ports: List<u16>,
    /// Outbound destination ports to capture: `*` or a comma list.
    #[arg(long, env = "EBB_INIT_OUTBOUND_PORTS", default_value = "*", value_parser = scope::<u16>)]
    pub outbound_ports: Scope<u16>,
    /// Outbound destination ports never captured.
    #[arg(long, env = "EBB_INIT_EXCLUDE_OUTBOUND_PORTS", default_value = "", value_parser = list::<u16>)]
    pub exclude_outbound_ports: List<u16>,
    /// Outbound destination CIDRs to capture: `*` or a comma list (IPv4 and IPv6 may mix).
    #[arg(long, env = "EBB_INIT_OUTBOUND_CIDRS", default_value = "*", value_parser = scope::<Cidr>)]
    pub outbound_cidrs: Scope<Cidr>,
    /// Outbound destination CIDRs never captured.
    #[arg(long, env = "EBB_INIT_EXCLUDE_OUTBOUND_CIDRS", default_value = "", value_parser = list::<Cidr>)]
    pub exclude_outbound_cidrs: List<Cidr>,
    /// Also write the IPv6 rules with ip6tables-restore.
    #[arg(long, env = "EBB_INIT_IPV6")]
    pub ipv6: bool,
    /// Print the iptables-restore input(s) instead of applying them.
    #[arg(long, env = "EBB_INIT_DRY_RUN")]
    pub dry_run: bool,
    /// Remove sidecar-init's chains and the jumps to them, and nothing else.
    #[arg(long, env = "EBB_INIT_CLEANUP")]
    pub cleanup: bool,
    /// iptables-restore binary.
    #[arg(long, env = "EBB_INIT_IPTABLES_RESTORE", default_value = "iptables-restore")]
    pub iptables_restore: PathBuf,
    /// iptables-save binary.
    #[arg(long, env = "EBB_INIT_IPTABLES_SAVE", default_value = "iptables-save")]
    pub iptables_save: PathBuf,
    /// ip6tables-restore binary (with --ipv6).
    #[arg(long, env = "EBB_INIT_IP6TABLES_RESTORE", default_value = "ip6tables-restore")]
    pub ip6tables_restore: PathBuf,
    /// ip6tables-save binary (with --ipv6).
    #[arg(long, env = "EBB_INIT_IP6TABLES_SAVE", default_value = "ip6tables-save")]
    pub ip6tables_save: PathBuf,
    /// After the rules, copy `--ebb` here (the shared volume the app's preStop runs `ebb drain` from):
    /// the init image needs no shell to do it.
    #[arg(long, env = "EBB_INIT_INSTALL_EBB")]
    pub install_ebb: Option<PathBuf>,
    /// The `ebb` binary `--install-ebb` copies.
    #[arg(long, env = "EBB_INIT_EBB", default_value = "/usr/local/bin/ebb")]
    pub ebb: PathBuf,
}

/// Either everything (`*`) or only the listed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope<T> {
    /// `*`: no restriction.
    All,
    /// Only these; an empty list captures nothing.
    Only(Vec<T>),
}

/// A comma-separated list; a newtype because clap would treat a bare `Vec` as a repeated flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

/// An IPv4 or IPv6 network, host bits cleared the way iptables itself stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A single list element that can be parsed from a flag value.
pub trait Item: Sized {
    /// Parses one element, saying what is wrong with it otherwise.
    fn parse_item(s: &str) -> Result<Self, String>;
}

impl Item for u16 {
    fn parse_item(s: &str) -> Result<Self, String> {
        port(s)
    }
}

impl Item for Cidr {
    fn parse_item(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8)");
        let (addr, prefix): (IpAddr, _) = match s.split_once('/') {
            Some((addr, prefix)) => (addr.parse().map_err(|_| bad())?, Some(prefix)),
            None => (s.parse().map_err(|_| bad())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

/// Parses a TCP port; 0 is refused because iptables cannot match or redirect to it.
fn port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// Parses a comma list, accepting the empty string so that an empty env var means "none".
fn list<T: Item>(s: &str) -> Result<List<T>, String> {
    s.split(',').map(str::trim).filter(|item| !item.is_empty()).map(T::parse_item).collect::<Result<_, _>>().map(List)
}

/// Parses `*` or a comma list.
fn scope<T: Item>(s: &str) -> Result<Scope<T>, String> {
    if s.trim() == "*" {
        Ok(Scope::All)
    } else {
        list(s).map(|l| Scope::Only(l.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv = std::iter::once("sidecar-init").chain(args.iter().copied());
        Config::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (flag, value) in [
            ("--inbound-ports", "80,http"),
            ("--exclude-inbound-ports", "0"),
            ("--outbound-ports", "65536"),
            ("--inbound-port", "70000"),
            ("--outbound-cidrs", "10.0.0.0/33"),
            ("--exclude-outbound-cidrs", "10.0.0/8"),
        ] {
            let err = parse(&[flag, value]).err().unwrap_or_default();
            assert!(err.contains(&format!("'{flag} <")), "{flag} {value}: {err:?}");
        }
    }

    #[test]
    fn lists_scopes_and_cidrs() {
        let args =
            ["--exclude-inbound-ports", "", "--outbound-ports", " 80 ,443", "--outbound-cidrs", "10.1.2.3/8,::1,::/0"];
        let cfg = parse(&args).unwrap();
        assert_eq!(cfg.exclude_inbound_ports, List(vec![]));
        assert_eq!(cfg.outbound_ports, Scope::Only(vec![80, 443]));
        let Scope::Only(cidrs) = cfg.outbound_cidrs else { panic!("{:?}", cfg.outbound_cidrs) };
        let cidrs: Vec<String> = cidrs.iter().map(Cidr::to_string).collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "::1/128", "::/0"]);
        assert_eq!(parse(&[]).unwrap().inbound_ports, Scope::All);
    }
}
