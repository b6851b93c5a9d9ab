package clusterpool

import (
	"testing"

	"github.com/clusterpool/clusterpool/clustertest"
)

func TestDecodeProcessID(t *testing.T) {
	tests := []struct {
		name string
		pid  uint32
		want NodeID
	}{
		// Short form: top bit 0, ID in bits 20..30, low 20 bits random.
		{"short 1", 0x00100000, 1},
		{"short 1 random bits", 0x001ABCDE, 1},
		{"short 2", 0x00200000 | 0x12345, 2},
		{"short 3", 0x003FFFFF, 3},
		{"short 2047 (largest)", 0x7FF00000 | 0xFFFFF, 2047},
		{"short 2047 no random", 0x7FF00000, 2047},
		{"short 0: no ID", 0x000FFFFF, 0},
		{"zero", 0, 0},
		// Long form: top bit 1, low 31 bits are the ID.
		{"long 5000", 0x80001388, 5000},
		{"long 1", 0x80000001, 1},
		{"long 2048", 0x80000800, 2048},
		{"long max", 0xFFFFFFFF, 1<<31 - 1},
		{"long 0", 0x80000000, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := DecodeProcessID(tt.pid); got != tt.want {
				t.Errorf("DecodeProcessID(%#08x) = %d, want %d", tt.pid, got, tt.want)
			}
		})
	}
}

// FuzzDecodeProcessID checks that decoding any ProcessID never panics and
// gives an ID in range (below 2048 in the short form, below 2^31 in the
// long one), that the short form's 20 random bits never change the ID, that
// distinct long IDs decode apart, and that it round-trips the encoding the
// clustertest proxy uses (the same as CockroachDB's) for every valid ID and
// any random bits. The seed corpus is in testdata/fuzz/FuzzDecodeProcessID.
func FuzzDecodeProcessID(f *testing.F) {
	f.Add(uint32(1), false, uint32(0))
	f.Add(uint32(2047), false, uint32(0xFFFFF))
	f.Add(uint32(5000), true, uint32(7))
	f.Add(uint32(1<<31-1), true, uint32(0))
	f.Fuzz(func(t *testing.T, pid uint32, long bool, random uint32) {
		got := DecodeProcessID(pid) // arbitrary input: must not panic
		if pid&(1<<31) == 0 {
			if got < 0 || got >= 1<<11 {
				t.Fatalf("DecodeProcessID(%#x) = %d, out of the short form's range", pid, got)
			}
			if other := DecodeProcessID(pid ^ random&(1<<20-1)); other != got {
				t.Fatalf("random bits change the ID: DecodeProcessID(%#x) = %d, DecodeProcessID(%#x) = %d",
					pid, got, pid^random&(1<<20-1), other)
			}
		} else {
			if got < 0 || got > 1<<31-1 {
				t.Fatalf("DecodeProcessID(%#x) = %d, out of the long form's range", pid, got)
			}
			if other := pid ^ (random&(1<<31-1) | 1); DecodeProcessID(other) == got {
				t.Fatalf("DecodeProcessID(%#x) = DecodeProcessID(%#x) = %d", pid, other, got)
			}
		}
		id := pid
		if long {
			id = id%(1<<31-1) + 1 // 1 .. 2^31-1
		} else {
			id = id%2047 + 1 // 1 .. 2047
		}
		encoded := clustertest.EncodeProcessID(id, long, random)
		if got := DecodeProcessID(encoded); got != NodeID(id) {
			t.Fatalf("DecodeProcessID(EncodeProcessID(%d, %v, %#x) = %#x) = %d", id, long, random, encoded, got)
		}
	})
}
