//go:build !unix

package sim

import "time"

// cpuTime is unknown here; CPU figures in Result stay zero.
func cpuTime() time.Duration { return 0 }

// fdLimit is unknown here.
func fdLimit() int { return 0 }
