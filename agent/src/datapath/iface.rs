//! Finds each local endpoint's host-side interface from the host's /32 routes and neighbours.
//!
//! The CNI convention meshd relies on (Calico's and Cilium's routed veths): the host
//! has a host-scope `/32` route to every pod IP through the pod's host-side veth. The
//! resolver reads the main routing table (`/proc/net/route`, the kernel's own dump of
//! the IPv4 FIB main table) and takes the output interface of each `/32` route; an IP
//! without such a route falls back to a complete neighbour (ARP) entry
//! (`/proc/net/arp`), which a bridged CNI leaves on the host. A route through a
//! gateway is not a local endpoint and is ignored. Both files are stable kernel
//! interfaces, so no netlink code (and no extra dependency) is needed; the cost is one
//! small read of each per rescan.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// A host-side interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
}

/// Where endpoint IPs live on this host (a seam so the syncer's tests need no routes).
pub trait InterfaceResolver: Send + std::fmt::Debug {
    /// IP → host-side interface of every endpoint-looking address the host knows.
    fn scan(&mut self) -> HashMap<Ipv4Addr, HostInterface>;

    /// This machine's own IPv4 addresses (the `host` identity); none by default.
    fn host_addresses(&mut self) -> std::collections::HashSet<Ipv4Addr> {
        std::collections::HashSet::new()
    }
}

/// The resolver of a real host: `/proc/net/route` first, then `/proc/net/arp`.
#[derive(Debug, Default, Clone)]
pub struct RouteResolver {
    /// `/proc/net` by default (tests point it elsewhere).
    pub proc_net: Option<std::path::PathBuf>,
    /// `/sys/class/net` by default.
    pub sys_class_net: Option<std::path::PathBuf>,
}

impl RouteResolver {
    /// Reads the host's files.
    pub fn new() -> Self {
        Self::default()
    }

    fn file(&self, name: &str) -> String {
        let dir = self.proc_net.clone().unwrap_or_else(|| "/proc/net".into());
        std::fs::read_to_string(dir.join(name)).unwrap_or_default()
    }

    fn sys(&self) -> std::path::PathBuf {
        self.sys_class_net
            .clone()
            .unwrap_or_else(|| "/sys/class/net".into())
    }

    fn is_bridge(&self, name: &str) -> bool {
        self.sys().join(name).join("bridge").exists()
    }

    fn ifindex(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.sys().join(name).join("ifindex"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl InterfaceResolver for RouteResolver {
    fn host_addresses(&mut self) -> std::collections::HashSet<Ipv4Addr> {
        super::reserved::parse_fib_trie_local(&self.file("fib_trie"))
    }

    fn scan(&mut self) -> HashMap<Ipv4Addr, HostInterface> {
        let mut names: HashMap<Ipv4Addr, String> = HashMap::new();
        for (ip, dev) in parse_arp(&self.file("arp")) {
            // A neighbour on a bridge names the bridge, not the pod's port: skip it.
            if !self.is_bridge(&dev) {
                names.insert(ip, dev);
            }
        }
        // Routes win over neighbours.
        for (ip, dev) in parse_routes(&self.file("route")) {
            names.insert(ip, dev);
        }
        let mut index_of: HashMap<String, Option<u32>> = HashMap::new();
        names
            .into_iter()
            .filter_map(|(ip, name)| {
                let ifindex = *index_of
                    .entry(name.clone())
                    .or_insert_with(|| self.ifindex(&name));
                Some((
                    ip,
                    HostInterface {
                        name,
                        ifindex: ifindex?,
                    },
                ))
            })
            .collect()
    }
}

/// `/32` routes without gateway: (destination, interface).
pub fn parse_routes(text: &str) -> Vec<(Ipv4Addr, String)> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dev, dst, gw, flags, mask) =
                (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let gw = u32::from_str_radix(gw, 16).ok()?;
            if flags & RTF_UP == 0 || flags & RTF_GATEWAY != 0 || gw != 0 || *mask != "FFFFFFFF" {
                return None;
            }
            // The file prints the address as the host-order value of a network-order u32.
            let dst = u32::from_str_radix(dst, 16).ok()?;
            Some((Ipv4Addr::from(dst.swap_bytes()), (*dev).to_owned()))
        })
        .collect()
}

/// Complete neighbour entries: (IP, interface).
pub fn parse_arp(text: &str) -> Vec<(Ipv4Addr, String)> {
    const ATF_COM: u32 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ip = f.first()?.parse().ok()?;
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            if flags & ATF_COM == 0 {
                return None;
            }
            Some((ip, (*f.get(5)?).to_owned()))
        })
        .collect()
}

/// A fixed table (tests and `--host-interfaces`-style static setups).
#[derive(Debug, Default, Clone)]
pub struct StaticResolver(pub HashMap<Ipv4Addr, HostInterface>);

impl InterfaceResolver for StaticResolver {
    fn scan(&mut self) -> HashMap<Ipv4Addr, HostInterface> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_neighbours() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
vethab\t0B0112C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
eth0\t0C0112C6\t010200C0\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_routes(routes),
            [(Ipv4Addr::new(198, 18, 1, 11), "vethab".to_owned())]
        );
        let arp = "IP address       HW type     Flags       HW address            Mask     Device\n\
198.18.1.12      0x1         0x2         02:fc:00:00:00:05     *        br0\n\
198.18.1.13      0x1         0x0         00:00:00:00:00:00     *        br0\n";
        assert_eq!(
            parse_arp(arp),
            [(Ipv4Addr::new(198, 18, 1, 12), "br0".to_owned())]
        );
    }
}
