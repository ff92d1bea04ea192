package crypto

import (
	"strings"
	"testing"
)

// FuzzParseKeyring: a cluster key file is whatever the operator wrote;
// parsing must never panic, never echo key material in errors, and a
// parsed keyring must survive being written back out.
func FuzzParseKeyring(f *testing.F) {
	k, _ := GenerateClusterKey()
	f.Add([]byte(k + "\n"))
	f.Add([]byte("# comment\n\n" + k + "\n" + k + "\n"))
	f.Add([]byte("AAAAAAAAAAAAAAAAAAAAAA==\r\n"))
	f.Add([]byte("not base64 at all"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ring, err := ParseKeyring(b)
		if err != nil {
			for _, line := range strings.Fields(string(b)) {
				if len(line) >= 16 && strings.Contains(err.Error(), line) {
					t.Fatalf("error %q repeats input %q", err, line)
				}
			}
			return
		}
		var out strings.Builder
		for _, key := range ring {
			out.WriteString(encodeClusterKey(key) + "\n")
		}
		again, err := ParseKeyring([]byte(out.String()))
		if err != nil || !again.Equal(ring) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzParsePrivateKey(f *testing.F) {
	k, _ := GeneratePrivateKey()
	f.Add(k.encode())
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		key, err := ParsePrivateKey(s)
		if err != nil {
			// Only strings long enough to be key material count.
			if in := strings.TrimSpace(s); len(in) >= 16 && strings.Contains(err.Error(), in) {
				t.Fatalf("error repeats the input")
			}
			return
		}
		if again, err := ParsePrivateKey(key.encode()); err != nil || again.Bytes() != key.Bytes() {
			t.Fatal("round trip failed")
		}
	})
}
