//! Random operation sequences sent through the server to a sparse file, checked against an
//! in-memory model of the disk: every read returns what the model says, whatever mix of
//! writes, trims, zeroes (with and without NO_HOLE) and flushes came before.

mod common;

use common::raw::{Raw, CMD_FLUSH, CMD_READ, CMD_WRITE};
use common::{pattern, test_config, TestServer};
use proptest::prelude::*;

const SIZE: usize = 256 * 1024;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: usize,
        len: usize,
        seed: u64,
        fua: bool,
    },
    Trim {
        offset: usize,
        len: usize,
    },
    Zero {
        offset: usize,
        len: usize,
        no_hole: bool,
    },
    Flush,
    Read {
        offset: usize,
        len: usize,
    },
}

fn range() -> impl Strategy<Value = (usize, usize)> {
    (0..SIZE, 1usize..65536).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (range(), any::<u64>(), any::<bool>()).prop_map(|((offset, len), seed, fua)| Op::Write { offset, len, seed, fua }),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (range(), any::<bool>()).prop_map(|((offset, len), no_hole)| Op::Zero { offset, len, no_hole }),
        1 => Just(Op::Flush),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn server_matches_a_model_disk(ops in proptest::collection::vec(op(), 1..40), structured in any::<bool>()) {
        let t = TestServer::start(&[("disk", SIZE as u64)], test_config());
        let mut c = Raw::open(&t.socket, "disk", structured);
        let mut model = vec![0u8; SIZE];
        for (i, op) in ops.iter().enumerate() {
            let handle = i as u64;
            match *op {
                Op::Write { offset, len, seed, fua } => {
                    let data = pattern(len, seed);
                    c.request(CMD_WRITE, if fua { FLAG_FUA } else { 0 }, handle, offset as u64, len as u32, &data);
                    model[offset..offset + len].copy_from_slice(&data);
                }
                Op::Trim { offset, len } => {
                    // A trimmed range may read back as anything; our file backend reads zeros.
                    c.request(CMD_TRIM, 0, handle, offset as u64, len as u32, &[]);
                    model[offset..offset + len].fill(0);
                }
                Op::Zero { offset, len, no_hole } => {
                    let flags = if no_hole { FLAG_NO_HOLE } else { 0 };
                    c.request(CMD_WRITE_ZEROES, flags, handle, offset as u64, len as u32, &[]);
                    model[offset..offset + len].fill(0);
                }
                Op::Flush => c.request(CMD_FLUSH, 0, handle, 0, 0, &[]),
                Op::Read { offset, len } => {
                    c.request(CMD_READ, 0, handle, offset as u64, len as u32, &[]);
                    let (h, err, data) = c.reply(len);
                    prop_assert_eq!((h, err), (handle, 0));
                    prop_assert!(data == model[offset..offset + len], "read {} at {} differs from the model", len, offset);
                    continue;
                }
            }
            // One request at a time, so the model's order is the server's order.
            let (h, err, _) = c.reply(0);
            prop_assert_eq!((h, err), (handle, 0));
        }
        prop_assert!(std::fs::read(t.image("disk")).expect("image") == model, "file differs from the model");
    }
}
