use super::*;
use proptest::prelude::*;

fn conf_state() -> impl Strategy<Value = ConfState> {
    let ids = || proptest::collection::vec(any::<u64>(), 0..5);
    (ids(), ids(), ids(), ids(), any::<bool>()).prop_map(
        |(voters, learners, voters_outgoing, learners_next, auto_leave)| ConfState {
            voters,
            learners,
            voters_outgoing,
            learners_next,
            auto_leave,
            ..ConfState::default()
        },
    )
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    let metadata = (
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(conf_state()),
    )
        .prop_map(|(index, term, conf_state)| {
            let mut metadata = SnapshotMetadata {
                index,
                term,
                ..SnapshotMetadata::default()
            };
            if let Some(conf_state) = conf_state {
                metadata.set_conf_state(conf_state);
            }
            metadata
        });
    (
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::option::of(metadata),
    )
        .prop_map(|(data, metadata)| {
            let mut snapshot = Snapshot {
                data: data.into(),
                ..Snapshot::default()
            };
            if let Some(metadata) = metadata {
                snapshot.set_metadata(metadata);
            }
            snapshot
        })
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        0u8..3,
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 0..8),
        any::<bool>(),
    )
        .prop_map(|(entry_type, term, index, data, context, sync_log)| Entry {
            entry_type: entry_type_from_number(entry_type).unwrap(),
            term,
            index,
            data: data.into(),
            context: context.into(),
            sync_log,
            ..Entry::default()
        })
}

/// Small numbers most of the time (what raft sends), any u64 sometimes (the varint edges).
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..300, 1 => any::<u64>()]
}

fn message() -> impl Strategy<Value = Message> {
    let header = (
        0u8..19,
        number(),
        number(),
        number(),
        number(),
        number(),
        number(),
        number(),
    );
    let rest = (
        number(),
        number(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..8),
        number(),
        any::<i64>(),
        proptest::collection::vec(entry(), 0..4),
        proptest::option::of(snapshot()),
    );
    (header, rest).prop_map(
        |(
            (msg_type, to, from, term, log_term, index, commit, commit_term),
            (
                request_snapshot,
                reject_hint,
                reject,
                context,
                deprecated_priority,
                priority,
                entries,
                snapshot,
            ),
        )| {
            let mut message = Message {
                msg_type: message_type_from_number(msg_type).unwrap(),
                to,
                from,
                term,
                log_term,
                index,
                commit,
                commit_term,
                request_snapshot,
                reject_hint,
                reject,
                context: context.into(),
                deprecated_priority,
                priority,
                ..Message::default()
            };
            message.entries = entries.into();
            if let Some(snapshot) = snapshot {
                message.set_snapshot(snapshot);
            }
            message
        },
    )
}

fn frame() -> impl Strategy<Value = PeerFrame> {
    (
        any::<u64>(),
        number(),
        number(),
        proptest::collection::vec((number(), message()), 0..4),
    )
        .prop_map(|(store_id, from, to, messages)| PeerFrame {
            store_id,
            from: NodeId(from),
            to: NodeId(to),
            messages: messages
                .into_iter()
                .map(|(group, message)| (GroupId(group), message))
                .collect(),
        })
}

fn framed(frame: &PeerFrame) -> Vec<u8> {
    let mut bytes = Vec::new();
    append_stream_frame(&mut bytes, frame).expect("frame within the limit");
    bytes
}

/// A frame with one of each part, for the hand-written tests.
fn sample_frame() -> PeerFrame {
    let mut append = Message {
        msg_type: MessageType::MsgAppend,
        to: 2,
        from: 1,
        term: 5,
        log_term: 4,
        index: 100,
        commit: 99,
        priority: -3,
        ..Message::default()
    };
    append.entries = vec![Entry {
        entry_type: EntryType::EntryConfChangeV2,
        term: 5,
        index: 101,
        data: b"enqueue".to_vec().into(),
        context: b"ctx".to_vec().into(),
        ..Entry::default()
    }]
    .into();
    let mut snapshot = Snapshot {
        data: b"state".to_vec().into(),
        ..Snapshot::default()
    };
    let mut metadata = SnapshotMetadata {
        index: 90,
        term: 4,
        ..SnapshotMetadata::default()
    };
    metadata.set_conf_state(ConfState {
        voters: vec![1, 2, 3],
        learners_next: vec![4],
        auto_leave: true,
        ..ConfState::default()
    });
    snapshot.set_metadata(metadata);
    let mut install = Message {
        msg_type: MessageType::MsgSnapshot,
        to: 2,
        from: 1,
        term: 5,
        ..Message::default()
    };
    install.set_snapshot(snapshot);
    PeerFrame {
        store_id: 7,
        from: NodeId(1),
        to: NodeId(2),
        messages: vec![(GroupId(0), append), (GroupId(23), install)],
    }
}

#[test]
fn a_frame_with_every_part_round_trips() {
    let frame = sample_frame();
    let payload = encode_peer_frame(&frame);
    assert_eq!(decode_peer_frame(&payload), Ok(frame.clone()));
    let bytes = framed(&frame);
    assert_eq!(split_stream_frame(&bytes), Ok((&payload[..], bytes.len())));
}

#[test]
fn the_smallest_items_have_the_sizes_the_decoder_assumes() {
    let empty_pair = PeerFrame {
        messages: vec![(GroupId(0), Message::default())],
        ..PeerFrame::default()
    };
    let header = encode_peer_frame(&PeerFrame::default()).len();
    assert_eq!(
        encode_peer_frame(&empty_pair).len() - header,
        GROUP_MESSAGE_BYTES_MIN
    );
    let mut entry = Vec::new();
    put_entry(&mut entry, &Entry::default());
    assert_eq!(entry.len(), ENTRY_BYTES_MIN);
}

#[test]
fn the_version_1_layout_is_stable() {
    // One heartbeat, byte by byte: a change here breaks rolling upgrades and needs a new version.
    let heartbeat = Message {
        msg_type: MessageType::MsgHeartbeat,
        to: 2,
        from: 1,
        term: 300,
        commit: 7,
        priority: -1,
        ..Message::default()
    };
    let frame = PeerFrame {
        store_id: 9,
        from: NodeId(1),
        to: NodeId(2),
        messages: vec![(GroupId(5), heartbeat)],
    };
    #[rustfmt::skip]
    let expected = [
        1, 9, 1, 2, 1,    // version, store, from, to, one message
        5, 8,             // group 5, MsgHeartbeat
        2, 1, 0xac, 2, 0, 0, 7, 0, 0, 0, // to, from, term 300, log_term, index, commit, commit_term, request_snapshot, reject_hint
        0, 0, 0, 1,       // reject, context, deprecated_priority, priority -1 (zigzag 1)
        0, 0,             // no entries, no snapshot
    ];
    assert_eq!(encode_peer_frame(&frame), expected);
}

#[test]
fn refuses_unknown_versions_and_enum_values_and_bad_booleans() {
    let payload = encode_peer_frame(&sample_frame());
    let mut bad = payload.clone();
    bad[0] = 2;
    assert_eq!(
        decode_peer_frame(&bad),
        Err(WireError::UnsupportedVersion(2))
    );

    let heartbeat = |msg_type: u8| {
        let mut bytes = vec![1, 0, 0, 0, 1, 0, msg_type];
        bytes.extend_from_slice(&[0; 15]);
        bytes
    };
    assert!(decode_peer_frame(&heartbeat(18)).is_ok());
    assert_eq!(
        decode_peer_frame(&heartbeat(19)),
        Err(WireError::UnknownMessageType(19))
    );

    let mut reject = heartbeat(8);
    reject[16] = 2; // the reject flag
    assert_eq!(decode_peer_frame(&reject), Err(WireError::InvalidBool(2)));

    let mut with_entry = heartbeat(3);
    with_entry[20] = 1; // one entry follows
    with_entry.truncate(21);
    with_entry.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        decode_peer_frame(&with_entry),
        Err(WireError::UnknownEntryType(3))
    );
}

#[test]
fn varints_must_be_short_and_fit_in_64_bits() {
    let varint = |bytes: &[u8]| Reader::new(bytes).varint();
    assert_eq!(varint(&[0x7f]), Ok(127));
    assert_eq!(varint(&[0x80, 0x01]), Ok(128));
    let mut max = Vec::new();
    put_varint(&mut max, u64::MAX);
    assert_eq!(max.len(), VARINT_BYTES_MAX);
    assert_eq!(varint(&max), Ok(u64::MAX));
    assert_eq!(varint(&[0x80, 0x00]), Err(WireError::MalformedVarint));
    let mut over = max.clone();
    over[9] = 0x02;
    assert_eq!(varint(&over), Err(WireError::MalformedVarint));
    assert_eq!(varint(&[0xff; 11]), Err(WireError::MalformedVarint));
    assert_eq!(varint(&[0x80]), Err(WireError::Truncated));
    for value in [i64::MIN, -1, 0, 1, i64::MAX] {
        assert_eq!(unzigzag(zigzag(value)), value);
    }
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // One message claiming 2^63 entries, and one frame claiming u64::MAX messages.
    let mut entries = vec![1, 0, 0, 0, 1, 0, 3];
    entries.extend_from_slice(&[0; 13]);
    put_varint(&mut entries, 1 << 63);
    assert_eq!(decode_peer_frame(&entries), Err(WireError::Truncated));
    let mut messages = vec![1, 0, 0, 0];
    put_varint(&mut messages, u64::MAX);
    assert_eq!(decode_peer_frame(&messages), Err(WireError::Truncated));
}

#[test]
fn stream_headers_over_the_limit_are_refused_before_reading_the_payload() {
    let mut header = Vec::new();
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        split_stream_frame(&header),
        Err(WireError::FrameTooLarge {
            bytes: u32::MAX as usize
        })
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let result = runtime.block_on(read_stream_payload(&mut &header[..]));
    assert!(matches!(
        result,
        Err(StreamError::Wire(WireError::FrameTooLarge { .. }))
    ));
}

#[test]
fn frames_over_the_limit_are_not_sent() {
    let big = Message {
        entries: vec![Entry {
            data: vec![0; PEER_FRAME_BYTES_MAX].into(),
            ..Entry::default()
        }]
        .into(),
        ..Message::default()
    };
    let frame = PeerFrame {
        messages: vec![(GroupId(0), big)],
        ..PeerFrame::default()
    };
    let mut out = vec![42];
    assert!(matches!(
        append_stream_frame(&mut out, &frame),
        Err(WireError::FrameTooLarge { .. })
    ));
    assert_eq!(out, [42], "a refused frame leaves the buffer as it was");
}

#[test]
fn async_reads_and_writes_frame_a_stream() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let frame = sample_frame();
        let mut stream = Vec::new();
        write_peer_frame(&mut stream, &frame).await.unwrap();
        write_peer_frame(&mut stream, &PeerFrame::default())
            .await
            .unwrap();
        let mut reader = &stream[..];
        assert_eq!(read_peer_frame(&mut reader).await.unwrap(), Some(frame));
        assert_eq!(
            read_peer_frame(&mut reader).await.unwrap(),
            Some(PeerFrame::default())
        );
        assert_eq!(
            read_peer_frame(&mut reader).await.unwrap(),
            None,
            "clean end"
        );

        let cut = &stream[..stream.len() - 1];
        let mut reader = cut;
        read_peer_frame(&mut reader).await.unwrap();
        match read_peer_frame(&mut reader).await {
            Err(StreamError::Io(error)) => assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("a frame cut short must be an EOF error, got {other:?}"),
        }
        let mut reader = &stream[..3];
        assert!(matches!(
            read_peer_frame(&mut reader).await,
            Err(StreamError::Io(_))
        ));
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_frames_round_trip(frame in frame()) {
        let payload = encode_peer_frame(&frame);
        prop_assert_eq!(decode_peer_frame(&payload), Ok(frame.clone()));
        let bytes = framed(&frame);
        let (inner, used) = split_stream_frame(&bytes).unwrap();
        prop_assert_eq!(inner, &payload[..]);
        prop_assert_eq!(used, bytes.len());
    }

    #[test]
    fn every_truncation_of_a_payload_is_an_error(frame in frame()) {
        let payload = encode_peer_frame(&frame);
        for end in 0..payload.len() {
            prop_assert!(decode_peer_frame(&payload[..end]).is_err(), "prefix of {} bytes", end);
        }
        let mut longer = payload.clone();
        longer.push(0);
        prop_assert_eq!(decode_peer_frame(&longer), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn every_truncation_and_bit_flip_of_a_stream_frame_is_an_error(frame in frame()) {
        let bytes = framed(&frame);
        for end in 0..bytes.len() {
            prop_assert!(split_stream_frame(&bytes[..end]).is_err(), "prefix of {} bytes", end);
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let result = split_stream_frame(&flipped);
            // CRC-32C catches every single-bit flip of the payload or the checksum; a flipped
            // length runs past the input, or over the limit, or cuts the payload short, whose
            // checksum then would have to match by chance (2^-32).
            prop_assert!(result.is_err(), "bit {} flipped was accepted", bit);
        }
    }

    #[test]
    fn bit_flips_in_a_payload_never_panic(frame in frame(), seed in any::<u64>()) {
        let payload = encode_peer_frame(&frame);
        let mut rng = phxq_types::Rng::new(seed);
        for _ in 0..64 {
            let mut flipped = payload.clone();
            let bit = rng.below(payload.len() as u64 * 8) as usize;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let _ = decode_peer_frame(&flipped);
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_peer_frame(&bytes);
        let _ = split_stream_frame(&bytes);
        // With a valid version and a plausible header the decoder goes deeper.
        let mut versioned = vec![PEER_FORMAT_VERSION, 7, 1, 2];
        versioned.extend_from_slice(&bytes);
        let _ = decode_peer_frame(&versioned);
    }
}

/// One message of `entries` entries of `bytes` bytes each.
fn frame_of_entries(messages: usize, entries: usize, bytes: usize) -> PeerFrame {
    let message = Message {
        msg_type: MessageType::MsgAppend,
        entries: (0..entries)
            .map(|i| Entry {
                index: i as u64 + 1,
                data: vec![7; bytes].into(),
                ..Entry::default()
            })
            .collect::<Vec<_>>()
            .into(),
        ..Message::default()
    };
    PeerFrame {
        store_id: 1,
        from: NodeId(1),
        to: NodeId(2),
        messages: vec![(GroupId(0), message); messages],
    }
}

#[test]
fn a_frame_over_the_batch_limit_holds_one_message_of_one_entry_or_is_refused() {
    let half = PEER_FRAME_BATCH_BYTES_MAX / 2 + 1;
    let one_large_entry = encode_peer_frame(&frame_of_entries(1, 1, 3 * half));
    assert!(one_large_entry.len() > PEER_FRAME_BATCH_BYTES_MAX);
    assert!(decode_peer_frame(&one_large_entry).is_ok());
    for (case, frame) in [
        ("two messages", frame_of_entries(2, 1, half)),
        ("two entries", frame_of_entries(1, 2, half)),
        // Many tiny entries: what would inflate most when decoded.
        (
            "many tiny entries",
            frame_of_entries(1, PEER_FRAME_BATCH_BYTES_MAX / 6, 0),
        ),
    ] {
        let payload = encode_peer_frame(&frame);
        assert!(payload.len() > PEER_FRAME_BATCH_BYTES_MAX, "{case}");
        assert_eq!(
            decode_peer_frame(&payload),
            Err(WireError::LargeFrameNotSingle),
            "{case}"
        );
    }
    // Within the batch limit, tiny entries decode: their inflation is bounded by the limit.
    let tiny = frame_of_entries(1, PEER_FRAME_BATCH_BYTES_MAX / 8, 0);
    let payload = encode_peer_frame(&tiny);
    assert!(payload.len() <= PEER_FRAME_BATCH_BYTES_MAX);
    let decoded = decode_peer_frame(&payload).unwrap();
    let decoded_bytes = decoded.messages[0].1.entries.len() * std::mem::size_of::<Entry>();
    assert!(
        decoded_bytes <= 128 << 20,
        "{decoded_bytes} bytes decoded from a batch-limit frame"
    );
}
