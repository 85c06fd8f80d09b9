//! Internet checksum arithmetic (RFC 1071 / RFC 1624), shared by the datapath and the tests.

/// Adds `data` as big-endian 16-bit words to `sum` (an odd last byte is padded with zero).
#[inline(always)]
pub fn add_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < data.len() {
        sum += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    if i < data.len() {
        sum += (data[i] as u32) << 8;
    }
    sum
}

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field value (big-endian number) for `data`, starting from a partial `sum`.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// Checksum of a whole buffer, as stored in a header field (big-endian number).
pub fn checksum(data: &[u8]) -> u16 {
    finish(add_bytes(0, data))
}

/// Pseudo-header sum for IPv4 TCP/UDP checksums.
pub fn ipv4_pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u32 {
    let mut sum = add_bytes(0, &src);
    sum = add_bytes(sum, &dst);
    sum + protocol as u32 + l4_len as u32
}

/// RFC 1624 incremental update of a checksum field (big-endian number) when 4 covered bytes
/// change from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!u16::from_be_bytes([old[0], old[1]])) as u32;
    sum += (!u16::from_be_bytes([old[2], old[3]])) as u32;
    sum += u16::from_be_bytes([new[0], new[1]]) as u32;
    sum += u16::from_be_bytes([new[2], new[3]]) as u32;
    !fold(sum)
}

/// [`replace4`] for 2 covered bytes (a port).
#[inline(always)]
pub fn replace2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!u16::from_be_bytes(old)) as u32;
    sum += u16::from_be_bytes(new) as u32;
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The example words from RFC 1071 section 3: sum 0xddf2, checksum 0x220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add_bytes(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), 0x220d);
    }

    #[test]
    fn buffer_with_its_checksum_sums_to_zero() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 0xac, 0x10,
            0x0a, 0x63, 0xac, 0x10, 0x0a, 0x0c,
        ];
        let c = checksum(&hdr);
        assert_eq!(c, 0xb1e6);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&hdr), 0);
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 0xc6, 0x12,
            0x01, 0x01, 0xc6, 0x13, 0x00, 0x0a,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        for new in [
            [198, 18, 2, 1],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [198, 19, 0, 10],
        ] {
            let mut changed = hdr;
            changed[16..20].copy_from_slice(&new);
            changed[10..12].copy_from_slice(&[0, 0]);
            let full = checksum(&changed);
            let incremental = replace4(c, [0xc6, 0x13, 0x00, 0x0a], new);
            // 0x0000 and 0xffff are the same number in one's complement.
            assert!(
                full == incremental || full | incremental == 0xffff && full & incremental == 0,
                "{new:?}: {full:#x} vs {incremental:#x}"
            );
        }
    }

    #[test]
    fn a_two_byte_update_matches_recomputation() {
        let data = [0x9c, 0x40, 0x00, 0x50, 0x12, 0x34];
        let c = checksum(&data);
        for new in [[0x1f, 0x90], [0, 0], [0xff, 0xff]] {
            let mut changed = data;
            changed[2..4].copy_from_slice(&new);
            let full = checksum(&changed);
            let incremental = replace2(c, [0x00, 0x50], new);
            assert!(
                full == incremental || full | incremental == 0xffff && full & incremental == 0,
                "{new:?}: {full:#x} vs {incremental:#x}"
            );
        }
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(add_bytes(0, &[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }
}
