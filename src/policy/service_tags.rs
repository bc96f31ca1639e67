//! Azure's published address ranges (`ServiceTags_Public.json`, weekly from Microsoft, or
//! `Get-AzNetworkServiceTag`): a rule that lists `service_tags` lets its names resolve only into
//! those tags' prefixes, so a spoofed answer, a hijacked resolver or a dangling CNAME cannot send
//! sync traffic outside Microsoft's ranges. Pure: the file's text in, sorted ranges out.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// The file as Microsoft writes it (fields we do not use are ignored).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    change_number: u64,
    cloud: String,
    values: Vec<Value>,
}

#[derive(serde::Deserialize)]
struct Value {
    name: String,
    properties: Properties,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Properties {
    address_prefixes: Vec<String>,
}

/// The tags of one file: name -> prefixes.
#[derive(Debug)]
pub struct ServiceTags {
    pub change_number: u64,
    pub cloud: String,
    tags: HashMap<String, Vec<IpNet>>,
}

impl ServiceTags {
    /// Parses the file's text; the error says where (line and column) and what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| {
            format!(
                "{}:{}: {e}; expected Microsoft's service tags JSON ({{\"changeNumber\", \"cloud\", \"values\": [{{\"name\", \"properties\": {{\"addressPrefixes\"}}}}]}})",
                e.line(),
                e.column()
            )
        })?;
        let mut tags = HashMap::with_capacity(file.values.len());
        for value in file.values {
            let prefixes = value
                .properties
                .address_prefixes
                .iter()
                .map(|p| {
                    p.parse::<IpNet>()
                        .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| format!("{}: {p:?}: expected an address prefix", value.name))
                })
                .collect::<Result<Vec<_>, _>>()?;
            tags.insert(value.name, prefixes);
        }
        Ok(Self {
            change_number: file.change_number,
            cloud: file.cloud,
            tags,
        })
    }

    /// The prefixes of the tag `name`, if the file has it.
    pub fn prefixes(&self, name: &str) -> Option<&[IpNet]> {
        self.tags.get(name).map(Vec::as_slice)
    }

    /// Every tag name, sorted (for error messages).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tags.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
}

/// Address ranges as sorted, merged intervals: membership is a binary search, whatever the
/// number of prefixes (Storage alone has thousands).
#[derive(Debug, Default)]
pub struct AddressRanges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl AddressRanges {
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let prefixes = prefixes.into_iter().map(|net| super::canonical_net(*net));
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in prefixes {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        Self {
            v4: merged(v4, |x| x.saturating_add(1)),
            v6: merged(v6, |x| x.saturating_add(1)),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => inside(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => inside(&self.v6, u128::from(v6)),
        }
    }
}

/// Sorted, with overlapping and adjacent (`next(end) == start`) ranges joined.
fn merged<T: Ord + Copy>(mut ranges: Vec<(T, T)>, next: fn(T) -> T) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= next(last.1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

fn inside<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|&(start, _)| start <= x);
    i > 0 && x <= ranges[i - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"changeNumber": 312, "cloud": "Public", "values": [
        {"name": "Storage.WestEurope", "id": "Storage.WestEurope", "properties": {"changeNumber": 40,
         "region": "westeurope", "systemService": "AzureStorage",
         "addressPrefixes": ["20.38.108.0/23", "20.60.0.0/24", "2603:1020:200::/48"]}},
        {"name": "AzureActiveDirectory", "properties": {"addressPrefixes": ["20.190.128.0/18"]}}
    ]}"#;

    #[test]
    fn the_published_format_parses_and_ranges_answer_by_binary_search() {
        let tags = ServiceTags::parse(SAMPLE).unwrap();
        assert_eq!((tags.change_number, tags.cloud.as_str()), (312, "Public"));
        assert_eq!(tags.names(), ["AzureActiveDirectory", "Storage.WestEurope"]);
        let ranges = AddressRanges::new(tags.prefixes("Storage.WestEurope").unwrap());
        for (ip, inside) in [
            ("20.38.108.1", true),
            ("20.38.109.255", true),
            ("20.38.110.0", false),
            ("20.60.0.9", true),
            ("20.59.255.255", false),
            ("10.0.0.1", false),
            ("::ffff:20.60.0.9", true),
            ("2603:1020:200::1", true),
            ("2603:1020:201::1", false),
        ] {
            assert_eq!(ranges.contains(ip.parse().unwrap()), inside, "{ip}");
        }
    }

    #[test]
    fn adjacent_and_nested_prefixes_merge() {
        let nets: Vec<IpNet> = [
            "10.0.0.0/25",
            "10.0.0.128/25",
            "10.0.0.64/26",
            "255.255.255.255/32",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let ranges = AddressRanges::new(&nets);
        assert_eq!(ranges.v4.len(), 2, "{ranges:?}");
        assert!(ranges.contains("10.0.0.200".parse().unwrap()));
        assert!(ranges.contains("255.255.255.255".parse().unwrap()));
    }

    #[test]
    fn a_malformed_file_says_where() {
        let err = ServiceTags::parse("{\"changeNumber\": 1,\n \"cloud\": 7}").unwrap_err();
        assert!(err.starts_with("2:"), "{err}");
        let err = ServiceTags::parse(r#"{"changeNumber": 1, "cloud": "Public", "values": [{"name": "X", "properties": {"addressPrefixes": ["nope"]}}]}"#).unwrap_err();
        assert_eq!(err, "X: \"nope\": expected an address prefix");
    }
}
