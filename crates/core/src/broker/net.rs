//! Which addresses a brokered call may connect to (SSRF protection).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused, or `None` for a public unicast address.
///
/// `allow_private` (`[broker] allow_private_networks`) lets private, loopback, link-local,
/// shared (CGNAT) and unique-local addresses through; unspecified, multicast, broadcast and
/// reserved addresses are never connected to.
pub(crate) fn refused(ip: IpAddr, allow_private: bool) -> Option<&'static str> {
    let class = match ip {
        IpAddr::V4(a) => v4_class(a),
        IpAddr::V6(a) => v6_class(a),
    };
    match class {
        Class::Public => None,
        Class::Private(_) if allow_private => None,
        Class::Private(why) | Class::Never(why) => Some(why),
    }
}

enum Class {
    Public,
    /// Reachable only inside some network: allowed by `allow_private_networks`.
    Private(&'static str),
    /// Never a sensible TCP destination.
    Never(&'static str),
}

fn v4_class(a: Ipv4Addr) -> Class {
    let o = a.octets();
    if a.is_unspecified() || o[0] == 0 {
        Class::Never("an unspecified (0.0.0.0/8) address")
    } else if a.is_broadcast() {
        Class::Never("the broadcast address")
    } else if a.is_multicast() {
        Class::Never("a multicast address")
    } else if o[0] >= 240 {
        Class::Never("a reserved (240.0.0.0/4) address")
    } else if a.is_loopback() {
        Class::Private("a loopback address")
    } else if a.is_private() {
        Class::Private("a private (RFC 1918) address")
    } else if a.is_link_local() {
        Class::Private("a link-local address")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Class::Private("a shared (100.64.0.0/10) address")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Class::Private("an IETF protocol (192.0.0.0/24) address")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Class::Private("a benchmarking (198.18.0.0/15) address")
    } else if a.is_documentation() {
        Class::Never("a documentation address")
    } else {
        Class::Public
    }
}

fn v6_class(a: Ipv6Addr) -> Class {
    let s = a.segments();
    if a.is_unspecified() {
        return Class::Never("the unspecified address (::)");
    }
    if a.is_loopback() {
        return Class::Private("a loopback address");
    }
    // Addresses that carry an IPv4 address: judge the IPv4 address.
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if s[..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible (deprecated).
        return v4_class(embedded(s[6], s[7]));
    }
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        // IPv4-translated (::ffff:0:0/96, RFC 2765).
        return v4_class(embedded(s[6], s[7]));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64's well-known prefix 64:ff9b::/96: the IPv4 address is the last 32 bits.
        return v4_class(embedded(s[6], s[7]));
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        // The rest of 64:ff9b::/32, the local-use 64:ff9b:1::/48 among them (RFC 8215): a
        // translator's own prefix, shorter than /96 (RFC 6052 puts the IPv4 address at
        // other bits then), reaching whatever IPv4 network it serves.
        return Class::Private("a local NAT64 (64:ff9b::/32) address");
    }
    if s[0] == 0x2002 {
        // 6to4.
        return v4_class(embedded(s[1], s[2]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Class::Private("a Teredo (2001::/32) address");
    }
    if s[0] & 0xff00 == 0xff00 {
        Class::Never("a multicast address")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Class::Private("a unique-local (fc00::/7) address")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Class::Private("a link-local address")
    } else if s[0] & 0xffc0 == 0xfec0 {
        Class::Private("a site-local address")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Class::Never("a documentation address")
    } else if s[0] == 0x0100 && s[1..4] == [0, 0, 0] {
        Class::Never("a discard (100::/64) address")
    } else {
        Class::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_refused() {
        let no = |s: &str| refused(s.parse().unwrap(), false);
        let yes_if_allowed = |s: &str| refused(s.parse().unwrap(), true);
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
        ] {
            assert_eq!(no(public), None, "{public}");
        }
        for private in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b::a00:1",
            // Local-use NAT64 with a /48 prefix: 127.0.0.1 and 169.254.169.254 at bits
            // 48-63 and 72-87, which a /96 reading took for 8.8.8.8.
            "64:ff9b:1:7f00:0:100:808:808",
            "64:ff9b:1:a9fe:a9:fe00:808:808",
            "64:ff9b:1::808:808",
            "2002:7f00:1::",
            "2001::1",
        ] {
            assert!(no(private).is_some(), "{private}");
            assert_eq!(yes_if_allowed(private), None, "{private}");
        }
        for never in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::",
            "ff02::1",
            "::ffff:0.0.0.0",
        ] {
            assert!(no(never).is_some(), "{never}");
            assert!(yes_if_allowed(never).is_some(), "{never}");
        }
    }
}
