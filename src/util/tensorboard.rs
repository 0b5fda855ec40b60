//! TensorBoard event files: `tensorboard --logdir runs` shows every run's curves.
//!
//! An event file is a sequence of TFRecords (length, its masked CRC-32C, the
//! data, its masked CRC-32C), each holding one serialised `tensorflow.Event`
//! protocol buffer: first a `file_version`, then summaries of scalar values at a
//! step. The few protobuf fields needed are written by hand below; the layout
//! follows TensorFlow's `event.proto` and `summary.proto`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::util::fsio::{FileError, write_atomic};

/// One scalar at one step: a point on the curve named `tag`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    pub value: f32,
}

/// The file name TensorBoard looks for: `events.out.tfevents.<time>.<host>`.
pub fn file_name(start_unix_secs: i64, host: &str) -> String {
    format!("events.out.tfevents.{start_unix_secs}.{host}")
}

/// A run as the HParams dashboard sees it: its hyperparameters, and whether it ended well.
pub struct Session<'a> {
    pub start_wall_time: f64,
    pub hparams: &'a BTreeMap<String, serde_json::Value>,
    /// `Some(true)` for a run that completed, `Some(false)` for one that failed.
    pub ended: Option<bool>,
}

/// Writes an event file, whole and atomically: the version record, the
/// session's hyperparameters, `scalars`, and how the session ended if it has.
/// Rewriting a file with more points keeps its earlier bytes, so a TensorBoard
/// that follows it reads on from where it was.
pub fn write_events(path: &Path, session: &Session, scalars: &[Scalar]) -> Result<(), FileError> {
    let mut file = Vec::new();
    record(&mut file, &version_event(session.start_wall_time));
    let start = session_start(session.start_wall_time, session.hparams);
    record(
        &mut file,
        &hparams_event(session.start_wall_time, SESSION_START_TAG, 3, &start),
    );
    for scalar in scalars {
        record(&mut file, &scalar_event(scalar));
    }
    if let Some(success) = session.ended {
        let end_time = scalars
            .last()
            .map_or(session.start_wall_time, |s| s.wall_time);
        let mut end = Vec::new();
        key(&mut end, 1, WIRE_VARINT);
        varint(&mut end, if success { 1 } else { 3 }); // STATUS_SUCCESS, STATUS_FAILURE
        double_field(&mut end, 2, end_time);
        record(
            &mut file,
            &hparams_event(end_time, SESSION_END_TAG, 4, &end),
        );
    }
    write_atomic(path, &file)
}

const SESSION_START_TAG: &str = "_hparams_/session_start_info";
const SESSION_END_TAG: &str = "_hparams_/session_end_info";

/// `SessionStartInfo { hparams: map<string, google.protobuf.Value>, start_time_secs }`.
fn session_start(start: f64, hparams: &BTreeMap<String, serde_json::Value>) -> Vec<u8> {
    let mut info = Vec::new();
    for (name, value) in hparams {
        let mut proto_value = Vec::new();
        match value {
            serde_json::Value::Number(n) => {
                double_field(&mut proto_value, 2, n.as_f64().unwrap_or(0.0))
            }
            serde_json::Value::Bool(b) => {
                key(&mut proto_value, 4, WIRE_VARINT);
                varint(&mut proto_value, *b as u64);
            }
            serde_json::Value::String(s) => bytes_field(&mut proto_value, 3, s.as_bytes()),
            other => bytes_field(&mut proto_value, 3, other.to_string().as_bytes()),
        }
        let mut entry = Vec::new();
        bytes_field(&mut entry, 1, name.as_bytes());
        bytes_field(&mut entry, 2, &proto_value);
        bytes_field(&mut info, 1, &entry);
    }
    double_field(&mut info, 5, start);
    info
}

/// An event whose one summary value carries the HParams plugin's data:
/// `HParamsPluginData { <field>: info }` in the value's metadata.
fn hparams_event(wall_time: f64, tag: &str, field: u32, info: &[u8]) -> Vec<u8> {
    let mut plugin_content = Vec::new();
    bytes_field(&mut plugin_content, field, info);
    let mut plugin_data = Vec::new();
    bytes_field(&mut plugin_data, 1, b"hparams");
    bytes_field(&mut plugin_data, 2, &plugin_content);
    let mut metadata = Vec::new();
    bytes_field(&mut metadata, 1, &plugin_data);
    let mut value = Vec::new();
    bytes_field(&mut value, 1, tag.as_bytes());
    bytes_field(&mut value, 9, &metadata);
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &value);
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    bytes_field(&mut event, 5, &summary);
    event
}

fn version_event(wall_time: f64) -> Vec<u8> {
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    bytes_field(&mut event, 3, b"brain.Event:2");
    event
}

/// `Event { wall_time, step, summary: Summary { value: [Value { tag, simple_value }] } }`.
fn scalar_event(scalar: &Scalar) -> Vec<u8> {
    let mut value = Vec::new();
    bytes_field(&mut value, 1, scalar.tag.as_bytes());
    key(&mut value, 2, WIRE_FIXED32);
    value.extend_from_slice(&scalar.value.to_le_bytes());
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &value);
    let mut event = Vec::new();
    double_field(&mut event, 1, scalar.wall_time);
    key(&mut event, 2, WIRE_VARINT);
    varint(&mut event, scalar.step as u64);
    bytes_field(&mut event, 5, &summary);
    event
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_BYTES: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field << 3) | wire as u32) as u64);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, WIRE_BYTES);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn double_field(out: &mut Vec<u8>, field: u32, value: f64) {
    key(out, field, WIRE_FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn record(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TFRecord's CRC-32C, rotated and offset as TensorFlow masks it.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the records back, checking both CRCs of each.
    fn records(file: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = file;
        while !rest.is_empty() {
            let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let length_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
            assert_eq!(length_crc, masked_crc(&rest[..8]));
            let data = &rest[12..12 + length];
            let data_crc = u32::from_le_bytes(rest[12 + length..16 + length].try_into().unwrap());
            assert_eq!(data_crc, masked_crc(data));
            out.push(data);
            rest = &rest[16 + length..];
        }
        out
    }

    /// The (field, wire type, payload) triples of one protobuf message.
    fn fields(mut message: &[u8]) -> Vec<(u32, u8, Vec<u8>)> {
        let read_varint = |bytes: &mut &[u8]| {
            let (mut value, mut shift) = (0u64, 0);
            loop {
                let byte = bytes[0];
                *bytes = &bytes[1..];
                value |= ((byte & 0x7f) as u64) << shift;
                if byte < 0x80 {
                    return value;
                }
                shift += 7;
            }
        };
        let mut out = Vec::new();
        while !message.is_empty() {
            let key = read_varint(&mut message);
            let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
            let payload = match wire {
                WIRE_VARINT => read_varint(&mut message).to_le_bytes().to_vec(),
                WIRE_FIXED64 | WIRE_FIXED32 => {
                    let n = if wire == WIRE_FIXED64 { 8 } else { 4 };
                    let (payload, rest) = message.split_at(n);
                    message = rest;
                    payload.to_vec()
                }
                WIRE_BYTES => {
                    let n = read_varint(&mut message) as usize;
                    let (payload, rest) = message.split_at(n);
                    message = rest;
                    payload.to_vec()
                }
                other => panic!("wire type {other}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    #[test]
    fn the_crc_is_castagnolis_masked_as_tensorflow_does() {
        // CRC-32C of "123456789" is 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn an_event_file_reads_back_as_its_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1_700_000_000, "host"));
        let scalars = [
            Scalar {
                tag: "loss/train".into(),
                step: 1,
                wall_time: 1.7e9 + 3.5,
                value: 0.25,
            },
            Scalar {
                tag: "accuracy/validation".into(),
                step: 300,
                wall_time: 1.7e9 + 7.0,
                value: 0.98,
            },
        ];
        let hparams = BTreeMap::from([
            ("optimizer.lr".to_string(), serde_json::json!(0.01)),
            ("model.kind".to_string(), serde_json::json!("lenet5")),
        ]);
        let session = Session {
            start_wall_time: 1.7e9,
            hparams: &hparams,
            ended: None,
        };
        write_events(&path, &session, &scalars).unwrap();
        let file = std::fs::read(&path).unwrap();
        let events = records(&file);
        assert_eq!(events.len(), 4);
        let version = fields(events[0]);
        assert_eq!(version[1], (3, WIRE_BYTES, b"brain.Event:2".to_vec()));
        let hparams_value = fields(&fields(&fields(events[1])[1].2)[0].2);
        assert_eq!(hparams_value[0].2, SESSION_START_TAG.as_bytes());
        for (event, scalar) in events[2..].iter().zip(&scalars) {
            let event = fields(event);
            assert_eq!(
                f64::from_le_bytes(event[0].2[..].try_into().unwrap()),
                scalar.wall_time
            );
            assert_eq!(
                u64::from_le_bytes(event[1].2[..].try_into().unwrap()),
                scalar.step as u64
            );
            let summary = fields(&event[2].2);
            let value = fields(&summary[0].2);
            assert_eq!(value[0].2, scalar.tag.as_bytes());
            assert_eq!(
                f32::from_le_bytes(value[1].2[..].try_into().unwrap()),
                scalar.value
            );
        }
        // More points append: the earlier bytes stay as they were.
        let more = [scalars[0].clone(), scalars[1].clone(), scalars[0].clone()];
        let ended = Session {
            ended: Some(true),
            ..session
        };
        write_events(&path, &ended, &more).unwrap();
        let longer = std::fs::read(&path).unwrap();
        assert!(longer.starts_with(&file));
        assert_eq!(
            records(&longer).len(),
            6,
            "three scalars and the session's end"
        );
    }
}
