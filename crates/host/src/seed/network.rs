//! `--failover-network`: the addresses a failed-over VM gets, parsed and checked strictly
//! (`docs/formats/failover-seed.md`), and written out as cloud-init network config version 2.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// Longest setting accepted: a full one (both families, a few DNS servers, a MAC) is about 250
/// bytes; the bound keeps one catalog record and one hello field small.
pub const FAILOVER_NETWORK_MAX: usize = 1024;

/// Most DNS servers: glibc's resolver reads three (`MAXNS`); eight leaves room for three of
/// each family without letting one setting grow without bound.
pub const DNS_SERVERS_MAX: usize = 8;

/// Why a `--failover-network` value is refused: one line naming the item.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("--failover-network: {0}")]
pub struct BadNetwork(String);

fn bad(why: impl Into<String>) -> BadNetwork {
    BadNetwork(why.into())
}

/// An address with its prefix length, checked to be a host address of its subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddr<A> {
    pub addr: A,
    pub prefix: u8,
}

impl<A: fmt::Display> fmt::Display for HostAddr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A checked failover network setting. `Display` is the normalized form kept and shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverNetwork {
    pub ipv4: Option<HostAddr<Ipv4Addr>>,
    pub gateway4: Option<Ipv4Addr>,
    pub ipv6: Option<HostAddr<Ipv6Addr>>,
    pub gateway6: Option<Ipv6Addr>,
    pub dns: Vec<IpAddr>,
    /// The NIC to configure, lower-case `xx:xx:xx:xx:xx:xx`.
    pub mac: Option<String>,
}

impl FailoverNetwork {
    /// Parses `ipv4=A/P,gateway=G,ipv6=A/P,gateway6=G,dns=D,...,mac=M` (any order; see
    /// `failover-seed.md` for every rule).
    pub fn parse(s: &str) -> Result<FailoverNetwork, BadNetwork> {
        if s.len() > FAILOVER_NETWORK_MAX {
            return Err(bad(format!(
                "the value is {} bytes; at most {FAILOVER_NETWORK_MAX} are accepted",
                s.len()
            )));
        }
        if s.trim().is_empty() {
            return Err(bad(
                "the value is empty (use --no-failover-network to remove it)",
            ));
        }
        let mut n = FailoverNetwork {
            ipv4: None,
            gateway4: None,
            ipv6: None,
            gateway6: None,
            dns: Vec::new(),
            mac: None,
        };
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(bad("an empty item (two commas, or a comma at an end)"));
            }
            let shown: String = item.chars().take(80).collect();
            let Some((key, value)) = item.split_once('=') else {
                return Err(bad(format!(
                    "item {shown:?} is not key=value (keys: ipv4, gateway, ipv6, gateway6, dns, mac)"
                )));
            };
            let twice = || bad(format!("{key} is given twice"));
            match key {
                "ipv4" => {
                    if n.ipv4.is_some() {
                        return Err(twice());
                    }
                    n.ipv4 = Some(parse_v4(value)?);
                }
                "gateway" => {
                    if n.gateway4.is_some() {
                        return Err(twice());
                    }
                    n.gateway4 = Some(parse_gateway4(value)?);
                }
                "ipv6" => {
                    if n.ipv6.is_some() {
                        return Err(twice());
                    }
                    n.ipv6 = Some(parse_v6(value)?);
                }
                "gateway6" => {
                    if n.gateway6.is_some() {
                        return Err(twice());
                    }
                    n.gateway6 = Some(parse_gateway6(value)?);
                }
                "dns" => {
                    let d = parse_dns(value)?;
                    if n.dns.contains(&d) {
                        return Err(bad(format!("dns {d} is given twice")));
                    }
                    if n.dns.len() == DNS_SERVERS_MAX {
                        return Err(bad(format!("more than {DNS_SERVERS_MAX} dns servers")));
                    }
                    n.dns.push(d);
                }
                "mac" => {
                    if n.mac.is_some() {
                        return Err(twice());
                    }
                    n.mac = Some(parse_mac(value)?);
                }
                _ => {
                    let k: String = key.chars().take(40).collect();
                    return Err(bad(format!(
                        "unknown key {k:?} (keys: ipv4, gateway, ipv6, gateway6, dns, mac)"
                    )));
                }
            }
        }
        match (n.ipv4, n.gateway4) {
            (None, Some(_)) => return Err(bad("gateway needs ipv4")),
            (Some(a), Some(g)) if a.addr == g => {
                return Err(bad(format!("gateway {g} is the VM's own address")))
            }
            _ => {}
        }
        match (n.ipv6, n.gateway6) {
            (None, Some(_)) => return Err(bad("gateway6 needs ipv6")),
            (Some(a), Some(g)) if a.addr == g => {
                return Err(bad(format!("gateway6 {g} is the VM's own address")))
            }
            _ => {}
        }
        if n.ipv4.is_none() && n.ipv6.is_none() {
            return Err(bad(
                "give an address: ipv4=ADDRESS/PREFIX or ipv6=ADDRESS/PREFIX",
            ));
        }
        Ok(n)
    }

    /// The `network-config` file (cloud-init network config version 2; the layout and why
    /// are in `failover-seed.md`).
    pub fn network_config_yaml(&self, header: &str) -> String {
        let mut y = format!("{header}version: 2\nethernets:\n  eth0:\n    match:\n");
        match &self.mac {
            Some(m) => y.push_str(&format!("      macaddress: {}\n", quoted(m))),
            None => y.push_str("      name: \"e*\"\n"),
        }
        y.push_str("    addresses:\n");
        if let Some(a) = self.ipv4 {
            y.push_str(&format!("      - {}\n", quoted(&a.to_string())));
        }
        if let Some(a) = self.ipv6 {
            y.push_str(&format!("      - {}\n", quoted(&a.to_string())));
        }
        if let Some(g) = self.gateway4 {
            y.push_str(&format!("    gateway4: {}\n", quoted(&g.to_string())));
        }
        if let Some(g) = self.gateway6 {
            y.push_str(&format!("    gateway6: {}\n", quoted(&g.to_string())));
        }
        if !self.dns.is_empty() {
            y.push_str("    nameservers:\n      addresses:\n");
            for d in &self.dns {
                y.push_str(&format!("        - {}\n", quoted(&d.to_string())));
            }
        }
        y
    }
}

impl fmt::Display for FailoverNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = Vec::new();
        if let Some(a) = self.ipv4 {
            items.push(format!("ipv4={a}"));
        }
        if let Some(g) = self.gateway4 {
            items.push(format!("gateway={g}"));
        }
        if let Some(a) = self.ipv6 {
            items.push(format!("ipv6={a}"));
        }
        if let Some(g) = self.gateway6 {
            items.push(format!("gateway6={g}"));
        }
        for d in &self.dns {
            items.push(format!("dns={d}"));
        }
        if let Some(m) = &self.mac {
            items.push(format!("mac={m}"));
        }
        f.write_str(&items.join(","))
    }
}

/// `s` as a YAML double-quoted scalar (a JSON string is one).
pub(crate) fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn split_prefix<'a>(key: &str, value: &'a str) -> Result<(&'a str, &'a str), BadNetwork> {
    value.split_once('/').ok_or_else(|| {
        bad(format!(
            "{key}={value}: give the prefix length too, as {key}=ADDRESS/PREFIX"
        ))
    })
}

fn prefix_len(key: &str, value: &str, prefix: &str, max: u8) -> Result<u8, BadNetwork> {
    match prefix.parse::<u8>() {
        Ok(p) if (1..=max).contains(&p) && !prefix.starts_with('+') => Ok(p),
        _ => Err(bad(format!(
            "{key}={value}: the prefix length must be 1 to {max}"
        ))),
    }
}

fn parse_v4(value: &str) -> Result<HostAddr<Ipv4Addr>, BadNetwork> {
    let (addr, prefix) = split_prefix("ipv4", value)?;
    let a: Ipv4Addr = addr
        .parse()
        .map_err(|_| bad(format!("ipv4={value}: {addr:?} is not an IPv4 address")))?;
    let prefix = prefix_len("ipv4", value, prefix, 32)?;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
        return Err(bad(format!(
            "ipv4={value}: {a} cannot be a VM's address (unspecified, loopback, multicast or broadcast)"
        )));
    }
    if prefix < 31 {
        let host_mask = u32::MAX >> prefix;
        let host = u32::from(a) & host_mask;
        if host == 0 {
            return Err(bad(format!(
                "ipv4={value}: {a} is the network address of its /{prefix}, not a host address"
            )));
        }
        if host == host_mask {
            return Err(bad(format!(
                "ipv4={value}: {a} is the broadcast address of its /{prefix}, not a host address"
            )));
        }
    }
    Ok(HostAddr { addr: a, prefix })
}

fn parse_v6(value: &str) -> Result<HostAddr<Ipv6Addr>, BadNetwork> {
    let (addr, prefix) = split_prefix("ipv6", value)?;
    let a: Ipv6Addr = addr
        .parse()
        .map_err(|_| bad(format!("ipv6={value}: {addr:?} is not an IPv6 address")))?;
    let prefix = prefix_len("ipv6", value, prefix, 128)?;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
        return Err(bad(format!(
            "ipv6={value}: {a} cannot be a VM's address (unspecified, loopback or multicast)"
        )));
    }
    if prefix < 127 {
        let host_mask = u128::MAX >> prefix;
        if u128::from(a) & host_mask == 0 {
            return Err(bad(format!(
                "ipv6={value}: {a} is the subnet-router anycast address of its /{prefix}, not a host address"
            )));
        }
    }
    Ok(HostAddr { addr: a, prefix })
}

fn parse_gateway4(value: &str) -> Result<Ipv4Addr, BadNetwork> {
    let g: Ipv4Addr = value
        .parse()
        .map_err(|_| bad(format!("gateway={value}: not an IPv4 address")))?;
    if g.is_unspecified() || g.is_loopback() || g.is_multicast() || g.is_broadcast() {
        return Err(bad(format!(
            "gateway={value}: not a unicast address a VM can route through"
        )));
    }
    Ok(g)
}

fn parse_gateway6(value: &str) -> Result<Ipv6Addr, BadNetwork> {
    let g: Ipv6Addr = value
        .parse()
        .map_err(|_| bad(format!("gateway6={value}: not an IPv6 address")))?;
    if g.is_unspecified() || g.is_loopback() || g.is_multicast() {
        return Err(bad(format!(
            "gateway6={value}: not a unicast address a VM can route through"
        )));
    }
    Ok(g)
}

fn parse_dns(value: &str) -> Result<IpAddr, BadNetwork> {
    let d: IpAddr = value
        .parse()
        .map_err(|_| bad(format!("dns={value}: not an IPv4 or IPv6 address")))?;
    let unusable = match d {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if unusable {
        return Err(bad(format!("dns={value}: not a unicast address")));
    }
    Ok(d)
}

fn parse_mac(value: &str) -> Result<String, BadNetwork> {
    let parts: Vec<&str> = value.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(bad(format!(
            "mac={value}: not a MAC address (six hex pairs with colons, e.g. 52:54:00:12:34:56)"
        )));
    }
    Ok(value.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_setting_is_normalized() {
        let n = FailoverNetwork::parse(
            " dns=10.2.0.53 ,ipv6=FD00:0:0::5/64,gateway6=fe80::1,ipv4=10.2.0.5/24,gateway=10.2.0.1,dns=fd00::53,mac=52:54:00:AB:cd:01",
        )
        .unwrap();
        assert_eq!(
            n.to_string(),
            "ipv4=10.2.0.5/24,gateway=10.2.0.1,ipv6=fd00::5/64,gateway6=fe80::1,dns=10.2.0.53,dns=fd00::53,mac=52:54:00:ab:cd:01"
        );
        assert_eq!(FailoverNetwork::parse(&n.to_string()).unwrap(), n);
    }

    #[test]
    fn a_gateway_outside_the_subnet_is_accepted() {
        let n = FailoverNetwork::parse("ipv4=10.2.0.5/24,gateway=10.9.9.1").unwrap();
        assert_eq!(n.gateway4, Some(Ipv4Addr::new(10, 9, 9, 1)));
    }

    #[test]
    fn point_to_point_prefixes_have_no_network_or_broadcast_address() {
        FailoverNetwork::parse("ipv4=10.0.0.0/31").unwrap();
        FailoverNetwork::parse("ipv4=10.0.0.1/31").unwrap();
        FailoverNetwork::parse("ipv4=10.0.0.255/32").unwrap();
        FailoverNetwork::parse("ipv6=fd00::/127").unwrap();
        FailoverNetwork::parse("ipv6=fd00::/128").unwrap();
    }

    #[test]
    fn bad_settings_are_refused_in_one_line() {
        for (value, want) in [
            ("", "empty"),
            ("ipv4=10.2.0.5", "prefix length too"),
            ("ipv4=10.2.0.5/33", "prefix length must be 1 to 32"),
            ("ipv4=10.2.0.5/0", "prefix length must be 1 to 32"),
            ("ipv4=10.2.0.5/+24", "prefix length"),
            ("ipv4=10.2.0.0/24", "network address"),
            ("ipv4=10.2.0.255/24", "broadcast address"),
            ("ipv4=127.0.0.5/8", "cannot be a VM's address"),
            ("ipv4=224.0.0.5/24", "cannot be a VM's address"),
            ("ipv4=10.2.0.300/24", "not an IPv4 address"),
            ("ipv4=fd00::5/64", "not an IPv4 address"),
            ("ipv6=fd00::/64", "subnet-router anycast"),
            ("ipv6=fd00::5/129", "1 to 128"),
            ("ipv6=ff02::1/64", "cannot be a VM's address"),
            ("ipv4=10.2.0.5/24,gateway=10.2.0.5", "the VM's own address"),
            ("ipv4=10.2.0.5/24,gateway=fd00::1", "not an IPv4 address"),
            ("ipv4=10.2.0.5/24,gateway=0.0.0.0", "not a unicast"),
            ("gateway=10.2.0.1,ipv6=fd00::5/64", "gateway needs ipv4"),
            ("ipv4=10.2.0.5/24,gateway6=fd00::1", "gateway6 needs ipv6"),
            ("ipv4=10.2.0.5/24,ipv4=10.2.0.6/24", "ipv4 is given twice"),
            (
                "ipv4=10.2.0.5/24,dns=1.1.1.1,dns=1.1.1.1",
                "dns 1.1.1.1 is given twice",
            ),
            ("ipv4=10.2.0.5/24,dns=0.0.0.0", "not a unicast"),
            ("ipv4=10.2.0.5/24,dns=example.com", "not an IPv4 or IPv6"),
            ("ipv4=10.2.0.5/24,,dns=1.1.1.1", "empty item"),
            ("ipv4=10.2.0.5/24,", "empty item"),
            (
                "ipv4=10.2.0.5/24,search=example.com",
                "unknown key \"search\"",
            ),
            ("IPV4=10.2.0.5/24", "unknown key"),
            ("ipv4 10.2.0.5/24", "not key=value"),
            ("dns=1.1.1.1", "give an address"),
            ("ipv4=10.2.0.5/24,mac=52:54:00:12:34", "not a MAC address"),
            (
                "ipv4=10.2.0.5/24,mac=52:54:00:12:34:zz",
                "not a MAC address",
            ),
        ] {
            let err = FailoverNetwork::parse(value).unwrap_err().to_string();
            assert!(err.contains(want), "{value:?}: {err}");
            assert!(err.starts_with("--failover-network: "), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let many: Vec<String> = (1..=9).map(|i| format!("dns=10.0.0.{i}")).collect();
        let err = FailoverNetwork::parse(&format!("ipv4=10.2.0.5/24,{}", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 8 dns"), "{err}");
        let long = format!("ipv4=10.2.0.5/24{}", " ".repeat(FAILOVER_NETWORK_MAX));
        assert!(FailoverNetwork::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("at most 1024"));
    }

    #[test]
    fn network_config_lists_addresses_gateways_and_servers() {
        let n = FailoverNetwork::parse(
            "ipv4=10.2.0.5/24,gateway=10.2.0.1,ipv6=fd00::5/64,gateway6=fd00::1,dns=10.2.0.53",
        )
        .unwrap();
        assert_eq!(
            n.network_config_yaml("# h\n"),
            "# h\nversion: 2\nethernets:\n  eth0:\n    match:\n      name: \"e*\"\n    addresses:\n      - \"10.2.0.5/24\"\n      - \"fd00::5/64\"\n    gateway4: \"10.2.0.1\"\n    gateway6: \"fd00::1\"\n    nameservers:\n      addresses:\n        - \"10.2.0.53\"\n"
        );
        let m = FailoverNetwork::parse("ipv6=fd00::5/64,mac=52:54:00:12:34:56").unwrap();
        let y = m.network_config_yaml("");
        assert!(
            y.contains("      macaddress: \"52:54:00:12:34:56\"\n"),
            "{y}"
        );
        assert!(!y.contains("gateway") && !y.contains("nameservers"), "{y}");
    }
}
