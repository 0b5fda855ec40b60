//! The values a sweep takes on the command line: `--set KEY=V1,V2,...` lists and
//! `--shard I/N`.

use crate::config::{Override, parse_value};

/// One `--set KEY=V1,V2,...` of a sweep: a single value applies to every run, a
/// comma list makes the key an axis of the grid (as Hydra's multirun does).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSet {
    pub key: String,
    pub values: Vec<toml::Value>,
}

impl std::str::FromStr for SweepSet {
    type Err = String;

    fn from_str(assignment: &str) -> Result<Self, String> {
        // The key is checked the way a plain override checks it.
        let first: Override = assignment.parse()?;
        let (_, value_text) = assignment.split_once('=').expect("parsed as KEY=VALUE");
        let parts = split_top_level(value_text, ',');
        if parts.len() == 1 {
            return Ok(SweepSet {
                key: first.key,
                values: vec![first.value],
            });
        }
        if parts.iter().any(|p| p.trim().is_empty()) {
            return Err(format!(
                "empty value in the comma list {value_text:?} (expected V1,V2,...)"
            ));
        }
        Ok(SweepSet {
            key: first.key,
            values: parts.iter().map(|p| parse_value(p)).collect(),
        })
    }
}

/// Splits at `separator` outside brackets, braces and quotes, so `[1, 2],[3]` is
/// two values.
fn split_top_level(text: &str, separator: char) -> Vec<&str> {
    let (mut parts, mut depth, mut quote, mut start) = (Vec::new(), 0i32, None, 0);
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, _) if c == separator && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// `--shard I/N`: the runs whose index is I modulo N (I counts from 0, as a Slurm
/// array's `SLURM_ARRAY_TASK_ID` does with `--array=0-(N-1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected = || format!("expected I/N with 0 <= I < N (e.g. 0/4), got {text:?}");
        let (index, count) = text.split_once('/').ok_or_else(expected)?;
        let index: usize = index.trim().parse().map_err(|_| expected())?;
        let count: usize = count.trim().parse().map_err(|_| expected())?;
        if count == 0 || index >= count {
            return Err(expected());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Round-robin, so each shard gets a similar mix of long and short runs.
    pub fn owns(&self, run_index: usize) -> bool {
        run_index % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_lists_respect_brackets_and_quotes() {
        let set: SweepSet = "data.dir=\"a,b\"".parse().unwrap();
        assert_eq!(set.values, vec![toml::Value::String("a,b".into())]);
        let set: SweepSet = "x.y=[1, 2],[3]".parse().unwrap();
        assert_eq!(set.values.len(), 2);
        let set: SweepSet = "optimizer.kind=sgd,adam".parse().unwrap();
        assert_eq!(
            set.values,
            vec![
                toml::Value::String("sgd".into()),
                toml::Value::String("adam".into())
            ]
        );
        assert!("optimizer.lr=0.1,".parse::<SweepSet>().is_err());
    }

    #[test]
    fn shards_cover_every_run_exactly_once() {
        for count in 1..=7 {
            let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
            for run in 0..23 {
                assert_eq!(shards.iter().filter(|s| s.owns(run)).count(), 1);
            }
        }
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
